"""LlavaChatCollator: labels on exactly the assistant turns' tokens under left and right padding, multi-turn and
truncation to max_length, for the real Llava, LLaVA-NeXT (anyres: the image's token count depends on its size) and
Qwen3-VL processors built locally; the image processor runs once per batch; what cannot be trained is named."""
import json
import os

import pytest
import torch
from PIL import Image

from llava_dsl.hf import sft
from llava_dsl.hf.data import DataError, LlavaChatCollator, to_messages
from llava_dsl.hf.tiny import (CHAT_TEMPLATE, V5, save_tiny_llava, tiny_llava, tiny_processor, tiny_qwen3_vl,
                               tiny_tokenizer)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Qwen3-VL's layout of an image (vision_start, the image_pad run, vision_end) in the tiny word-level template
QWEN_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", "<|vision_start|><|image_pad|><|vision_end|> ")
ANSWER_END = " </s>"  # what both templates emit after an assistant turn's text (part of the trained span)


def _qwen3_vl_processor():
    """A real Qwen3VLProcessor: Qwen2VLImageProcessor (patch 8, merge 2, so 32 px -> 4 image tokens) and a
    Qwen2 tokenizer over the tiny vocabulary, with Qwen's three vision tokens at the ids ``tiny_qwen3_vl`` uses.
    Its video processor needs torchvision, which these environments do not have; no video is processed here, so
    the processor is built without one (the only stand-in in this file)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    try:
        from transformers import Qwen2TokenizerFast as Qwen2Tokenizer
    except ImportError:  # transformers 5: one tokenizers-backed class
        from transformers import Qwen2Tokenizer

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, value):
            if name == "video_processor" and value is None:
                return None
            return super().check_argument_for_proper_class(name, value)

    tok = Qwen2Tokenizer(tokenizer_object=tiny_tokenizer().backend_tokenizer, unk_token="<unk>", eos_token="</s>",
                         pad_token="<pad>", bos_token=None)
    key = "extra_special_tokens" if V5 else "additional_special_tokens"
    tok.add_special_tokens({key: ["<|vision_end|>", "<|vision_start|>", "<|image_pad|>"]})
    image_processor = Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                            min_pixels=32 * 32, max_pixels=64 * 64)
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                     chat_template=QWEN_TEMPLATE)


def _llava_next_processor():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=[[32, 32]])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE, image_token="<image>")


MODELS = {"llava": lambda: tiny_llava(), "llava_next": lambda: tiny_llava(family="llava_next"),
          "qwen3_vl": lambda: tiny_qwen3_vl()}
PROCESSORS = {"llava": lambda: tiny_processor(tiny_llava()), "llava_next": _llava_next_processor,
              "qwen3_vl": _qwen3_vl_processor}
FAMILIES = list(PROCESSORS)


def _turns(*pairs):
    conv = []
    for j, (question, answer) in enumerate(pairs):
        conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + question},
                 {"from": "gpt", "value": answer}]
    return conv


# Very different lengths: one short turn, three long turns, two turns; images of three sizes (LLaVA-NeXT gives
# each size its own number of image tokens).
RECORDS = [
    ("short", (32, 32), _turns(("what is it ?", "a cat"))),
    ("long", (64, 32), _turns(("describe the image in one word ?", "the red cat is there in the image of a dog ."),
                              ("what color is it ?", "red blue green red blue green red blue green red blue green ."),
                              ("read the number ?", "one two three four five six seven eight nine zero"))),
    ("mid", (32, 48), _turns(("say a word ?", "yes"), ("is there a dog ?", "no , there is a cat ."))),
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collator_images")
    out = []
    for i, (rid, size, conv) in enumerate(RECORDS):
        path = str(folder / f"{rid}.png")
        Image.new("RGB", size, (40 * i, 120, 200 - 50 * i)).save(path)
        out.append({"id": rid, "image": path, "conversations": conv})
    return out


def _collate(processor, records, padding_side, max_length=None):
    processor.tokenizer.padding_side = padding_side
    return LlavaChatCollator(processor, max_length=max_length)(records)


def _rows(batch):
    """Each sample's (input_ids, labels) without its padding."""
    keep = batch["attention_mask"].bool()
    return [(batch["input_ids"][i][keep[i]].tolist(), batch["labels"][i][keep[i]].tolist())
            for i in range(len(keep))]


def _label_runs(labels):
    runs, current = [], []
    for token in labels + [-100]:
        if token == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs


def _image_token_id(processor):
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_answers_under_left_and_right_padding(family, records):
    processor = PROCESSORS[family]()
    tok = processor.tokenizer
    right = _collate(processor, records, "right")
    left = _collate(processor, records, "left")
    lengths = right["attention_mask"].sum(1)
    assert lengths.max() - lengths.min() > 20, lengths  # very different lengths: the padding matters
    # padding sits where the tokenizer says, and carries no label
    assert (left["attention_mask"][:, -1] == 1).all() and (right["attention_mask"][:, 0] == 1).all()
    for batch in (left, right):
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert _rows(left) == _rows(right)
    image_id = _image_token_id(processor)
    for rec, (ids, labels) in zip(records, _rows(left)):
        answers = [t["value"] for t in rec["conversations"][1::2]]
        expected = [tok(a + ANSWER_END, add_special_tokens=False)["input_ids"] for a in answers]
        assert _label_runs(labels) == expected, rec["id"]
        assert [tok.decode(run) for run in _label_runs(labels)] == [a + ANSWER_END for a in answers], rec["id"]
        # the image run is the one the processor gives this image alone, unlabelled
        alone = processor(text=[processor.apply_chat_template(to_messages(rec["conversations"]), tokenize=False)],
                          images=[Image.open(rec["image"]).convert("RGB")], return_tensors="pt")["input_ids"][0]
        assert ids == alone.tolist(), rec["id"]
        assert all(label == -100 for i, label in zip(ids, labels) if i == image_id)
    if family == "llava_next":  # anyres: the three image sizes give different numbers of image tokens
        counts = {int((row == image_id).sum()) for row in right["input_ids"]}
        assert len(counts) == 3, counts


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_processor_runs_once_per_batch(family, records, monkeypatch):
    processor = PROCESSORS[family]()
    calls = []
    cls = type(processor.image_processor)
    original = cls.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    _collate(processor, records, "left")
    assert len(calls) == 1, f"{len(calls)} image-processor calls for one batch of {len(records)} samples"


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_keeps_the_start_and_labels_what_is_left(family, records):
    processor = PROCESSORS[family]()
    full = _rows(_collate(processor, records, "right"))
    long_ids, long_labels = full[1]
    # cut inside the long sample's second answer
    runs_end = [i for i in range(1, len(long_labels)) if long_labels[i - 1] != -100 and long_labels[i] == -100]
    second_answer_start = [i for i in range(1, len(long_labels))
                           if long_labels[i - 1] == -100 and long_labels[i] != -100][1]
    max_length = second_answer_start + 3
    assert runs_end[0] < max_length < len(long_ids)
    for side in ("left", "right"):
        batch = _collate(processor, records, side, max_length=max_length)
        assert batch["input_ids"].shape[1] == max_length
        for (ids, labels), (ids_full, labels_full) in zip(_rows(batch), full):
            assert ids == ids_full[:max_length] and labels == labels_full[:max_length]
        # the cut answer keeps its first three tokens
        assert [len(r) for r in _label_runs(_rows(batch)[1][1])][-1] == 3
    # a model takes the truncated batch (image features and image tokens still agree)
    model = MODELS[family]()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss), loss


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sample_with_every_answer_token_cut_is_named(family, records):
    processor = PROCESSORS[family]()
    ids, labels = _rows(_collate(processor, records, "right"))[1]
    first_answer = next(i for i, label in enumerate(labels) if label != -100)
    with pytest.raises(DataError) as raised:
        _collate(processor, [records[1]], "left", max_length=first_answer)
    message = str(raised.value)
    for part in ("sample id 'long'", f"{len(ids)} tokens", f"max_length={first_answer}", "--max_length"):
        assert part in message, message


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sample_whose_image_would_be_cut_is_refused(family, records):
    processor = PROCESSORS[family]()
    ids, _ = _rows(_collate(processor, records, "right"))[0]
    last_image = max(i for i, t in enumerate(ids) if t == _image_token_id(processor))
    with pytest.raises(DataError) as raised:
        _collate(processor, records, "right", max_length=last_image)
    message = str(raised.value)
    for part in ("sample id 'short'", "image", f"max_length={last_image}", "--max_length"):
        assert part in message, message


def test_a_template_that_is_not_prefix_stable_is_named(records):
    processor = PROCESSORS["llava"]()
    # the template writes a closing word after the last message only: a prefix is not the start of the full text
    processor.chat_template = CHAT_TEMPLATE.replace("{% endfor %}{% if add_generation_prompt %}",
                                                    "{% endfor %}the {% if add_generation_prompt %}")
    with pytest.raises(DataError) as raised:
        _collate(processor, records[:1], "right")
    assert "sample id 'short'" in str(raised.value) and "prefix" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_left_padded_batch_gives_each_sample_its_loss_alone(family, records):
    """The collated batch goes through the model; the loss equals the mean token loss of each sample alone."""
    processor = PROCESSORS[family]()
    model = MODELS[family]()
    batch = _collate(processor, records, "left")
    with torch.no_grad():
        logits = model(**batch).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")
    per_sample_tokens = (shift_labels != -100).sum(1)
    assert (per_sample_tokens > 0).all(), per_sample_tokens
    # each sample's answer loss in the batch equals its loss alone (the padding changes nothing)
    for i, rec in enumerate(records):
        alone = _collate(processor, [rec], "left")
        with torch.no_grad():
            logits_alone = model(**alone).logits
        loss_alone = torch.nn.functional.cross_entropy(logits_alone[0, :-1], alone["labels"][0, 1:], reduction="sum")
        assert torch.allclose(losses[i].sum(), loss_alone, rtol=1e-4, atol=1e-4), (rec["id"], losses[i].sum(),
                                                                                 loss_alone)


def test_the_entry_point_truncates_to_its_max_length(records, tmp_path, capsys):
    """--max_length reaches the collator: a length that cuts every answer of a record stops the run, naming it."""
    save_tiny_llava(str(tmp_path / "model"))
    data = [{"id": r["id"], "image": os.path.basename(r["image"]), "conversations": r["conversations"]}
            for r in records]
    with open(tmp_path / "data.json", "w") as f:
        json.dump(data, f)
    argv = ["--model_name_or_path", tmp_path / "model", "--data_path", tmp_path / "data.json",
            "--image_folder", os.path.dirname(records[0]["image"]), "--output_dir", tmp_path / "out",
            "--max_steps", "1", "--per_device_train_batch_size", "3", "--max_length", "25", "--use_cpu", "True",
            "--bf16", "False", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0"]
    with pytest.raises(DataError) as raised:
        sft.main([str(a) for a in argv])
    assert "max_length=25" in str(raised.value), str(raised.value)
