import torch
import torch.nn as nn

from transformers import CLIPVisionModel, CLIPImageProcessor, CLIPVisionConfig


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()

        self.is_loaded = False

        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, 'mm_vision_select_feature', 'patch')

        if not delay_load:
            self.load_model()
        elif getattr(args, 'unfreeze_mm_vision_tower', False):
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(self.vision_tower_name)

        self.skip_layers, self.detach_depth = self.resolve_skip_layers(args)

    def resolve_skip_layers(self, args):
        """Hidden-state indices tapped below the main layer (deepest first) and how many of them are detached.

        From the train flags (--mm_vision_skip_layers "6,12,18", or --mm_vision_skip_stride S: blocks S, 2S, ...
        below the main layer, default S = depth // 4) or from a saved config (the resolved list).
        """
        skip_layers = getattr(args, 'mm_vision_skip_layers', None)
        stride = getattr(args, 'mm_vision_skip_stride', None)
        detach_depth = getattr(args, 'mm_vision_detach_depth', None)
        projector_type = getattr(args, 'mm_projector_type', None) or ''
        if not projector_type.endswith('_multilayer'):
            if skip_layers is not None or stride is not None or detach_depth:
                raise ValueError(f'--mm_vision_skip_layers/--mm_vision_skip_stride/--mm_vision_detach_depth need a '
                                 f'*_multilayer --mm_projector_type, got {projector_type!r}')
            return None, None
        num_blocks = self.config.num_hidden_layers
        main = self.select_layer % (num_blocks + 1)
        if skip_layers is None:
            stride = max(1, num_blocks // 4) if stride is None else stride
            skip_layers = list(range(stride, main, stride)) if stride > 0 else []
        elif stride is not None:
            raise ValueError('give --mm_vision_skip_layers or --mm_vision_skip_stride, not both')
        elif isinstance(skip_layers, str):
            skip_layers = [int(i) for i in skip_layers.strip('[]').split(',')]
        taps = sorted({i % (num_blocks + 1) for i in skip_layers if -num_blocks - 1 <= i <= num_blocks}, reverse=True)
        if not taps or len(taps) != len(skip_layers) or taps[0] >= main:
            raise ValueError(f'vision layers {skip_layers} (stride {stride}): expected distinct blocks below the main '
                             f'layer {main} of a {num_blocks}-block vision tower')
        if not projector_type.startswith('detached_'):
            if detach_depth:
                raise ValueError(f'--mm_vision_detach_depth={detach_depth}: {projector_type} detaches no layer')
            return taps, 0
        if detach_depth is None:  # default: detach the taps in the first half of the tower
            detach_depth = sum(tap <= num_blocks // 2 for tap in taps)
        if not 0 <= detach_depth <= len(taps):
            raise ValueError(f'--mm_vision_detach_depth={detach_depth}: expected 0..{len(taps)} (taps {taps})')
        return taps, detach_depth

    def load_model(self, device_map=None):
        if self.is_loaded:
            print('{} is already loaded, `load_model` called again, skipping.'.format(self.vision_tower_name))
            return

        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.vision_tower.requires_grad_(False)

        self.is_loaded = True

    def feature_select(self, image_forward_outs):
        # main layer first, then the skip taps deep -> shallow, concatenated on channels
        layers = [self.select_layer] + (self.skip_layers or [])
        hidden_states = [image_forward_outs.hidden_states[i] for i in layers]
        # Detached Skip-Links: stop-gradient on the shallowest taps (the tail); those blocks still learn via the main layer
        attached = len(hidden_states) - (self.detach_depth or 0)
        image_features = torch.cat(hidden_states[:attached] + [h.detach() for h in hidden_states[attached:]], dim=-1)
        if self.select_feature == 'patch':
            image_features = image_features[:, 1:]
        elif self.select_feature == 'cls_patch':
            image_features = image_features
        else:
            raise ValueError(f'Unexpected select feature: {self.select_feature}')
        return image_features

    # no torch.no_grad(): a frozen tower builds no graph anyway, and --unfreeze_mm_vision_tower trains it
    def forward(self, images):
        if type(images) is list:
            image_features = []
            for image in images:
                image_forward_out = self.vision_tower(image.to(device=self.device, dtype=self.dtype).unsqueeze(0), output_hidden_states=True)
                image_feature = self.feature_select(image_forward_out).to(image.dtype)
                image_features.append(image_feature)
        else:
            image_forward_outs = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
            image_features = self.feature_select(image_forward_outs).to(images.dtype)

        return image_features

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device

    @property
    def config(self):
        if self.is_loaded:
            return self.vision_tower.config
        else:
            return self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches_per_side(self):
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self):
        return (self.config.image_size // self.config.patch_size) ** 2
