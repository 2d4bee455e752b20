"""Run exported models with stock transformers (in .venv-hf) and write what they compute to a file.

    .venv-hf/bin/python scripts/hf_env/hf_llava_check.py REQUEST.pt RESULT.pt

REQUEST.pt (``torch.save``) is a list of cases, each a dict:
  model_dir       an export of ``python -m llava_dsl.export_hf``
  input_ids       LongTensor [1, L]: prompt ids with <image> already expanded to image_seq_length tokens
  pixel_values    FloatTensor [1, 3, H, W]
  max_new_tokens  int, greedy generation length
  messages        chat messages for the processor's chat template (optional)
  images          image file paths for the processor (optional)
RESULT.pt is a list of dicts: logits, generated (new tokens), prompt / processor_input_ids /
processor_pixel_values (from AutoProcessor), config (LlavaConfig fields as loaded), loading_info (missing,
unexpected, mismatched keys), model_warnings / processor_warnings (everything logged at warning level while
loading and running the model / the processor), plugin_importable, versions.

Imports only torch, transformers and PIL, so it needs nothing from llava or llava_dsl.
"""
import importlib.util
import logging
import sys
import warnings

import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

CONFIG_FIELDS = ("vision_feature_layer", "vision_feature_select_strategy", "image_token_index", "image_seq_length",
                 "projector_hidden_act", "multimodal_projector_bias")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_case(case, log):
    model_dir = case["model_dir"]
    config = LlavaConfig.from_pretrained(model_dir)
    # transformers 4.56 renamed torch_dtype= to dtype= (the old name now logs a deprecation warning)
    dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True,
                                                               **{dtype_kwarg: torch.float32})
    model.eval()
    input_ids = case["input_ids"]
    pixel_values = case["pixel_values"].float()
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        sequences = model.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=False,
                                   max_new_tokens=case["max_new_tokens"],
                                   min_new_tokens=case.get("min_new_tokens", 0))
    model_warnings = list(log.messages)
    log.messages.clear()
    result = {
        "model_warnings": model_warnings,
        "logits": logits,
        "generated": sequences[0, input_ids.shape[1]:].tolist(),
        "config": {field: getattr(config, field) for field in CONFIG_FIELDS},
        "vision_hidden_size": config.vision_config.hidden_size,
        "text_vocab_size": config.text_config.vocab_size,
        "lm_head_tied": (model.get_output_embeddings().weight.data_ptr()
                         == model.get_input_embeddings().weight.data_ptr()),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    }
    if case.get("messages") is not None:
        processor = AutoProcessor.from_pretrained(model_dir)
        prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True)
        images = [Image.open(path).convert("RGB") for path in case.get("images", [])]
        inputs = processor(images=images or None, text=prompt, return_tensors="pt")
        result.update(prompt=prompt, processor_input_ids=inputs["input_ids"][0].tolist(),
                      processor_pixel_values=inputs.get("pixel_values"),
                      processor_classes=[type(processor.tokenizer).__name__, type(processor.image_processor).__name__])
    result["processor_warnings"] = list(log.messages)
    log.messages.clear()
    return result


def main(request_path, result_path):
    log = _Collect()
    transformers.logging.set_verbosity_warning()
    transformers.logging.get_logger().addHandler(log)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(log)
    warnings.simplefilter("always")
    cases = torch.load(request_path)
    results = [run_case(case, log) for case in cases]
    plugin = {name: importlib.util.find_spec(name) is not None for name in ("llava", "llava_dsl")}
    for result in results:
        result["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
        result["plugin_importable"] = plugin
    torch.save(results, result_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
