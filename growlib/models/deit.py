"""DeiT (ViT's pre-LN encoder with a distillation token): DeiTForImageClassification,
DeiTForImageClassificationWithTeacher and DeiTModel.

Everything is ViT's (growlib.models.vit) but two learned tokens before the patches, the class token and the
distillation token (so the position table has patches + 2 rows), and the teacher variant's two classifiers:
``cls_classifier`` on the class token (``head.out``, as ViT's ``classifier``) and ``distillation_classifier`` on
the distillation token (``head.distillation``), whose logits it averages."""

from __future__ import annotations

import dataclasses

from .base import SlotSpec, in_, out_
from .vit import DIGITS_VIT, ViTAdapter, _class_token

_TEACHER = "DeiTForImageClassificationWithTeacher"


class DeiTAdapter(ViTAdapter):
    family = "deit"
    modeling_module = "transformers.models.deit.modeling_deit"
    model_class_names = ("DeiTForImageClassification", _TEACHER, "DeiTModel")
    layer_class_name = "DeiTLayer"
    prefix_tokens = 2

    def specs(self, model_class, config, tied, add_pooling_layer: bool = True):
        specs = super().specs(model_class, config, tied, add_pooling_layer)
        p = "" if model_class.__name__ == self.model_class_names[-1] else f"{self.family}."
        at = next(i for i, spec in enumerate(specs) if spec.name == "embed.cls") + 1
        specs.insert(at, SlotSpec("embed.distillation", None, f"{p}embeddings.distillation_token",
                                  (out_("model"),), _class_token))
        if model_class.__name__ == _TEACHER:
            specs = [dataclasses.replace(s, source=f"cls_{s.source}") if s.source.startswith("classifier.") else s
                     for s in specs]
            specs += [SlotSpec("head.distillation.weight", None, "distillation_classifier.weight",
                               (out_("labels"), in_("model")), lambda t: t),
                      SlotSpec("head.distillation.bias", None, "distillation_classifier.bias", (out_("labels"),),
                               lambda t: t)]
        return specs

    def training_model(self, size, vocab_size, seq_len):
        """Shaped for the embedded digits images: ``vocab_size`` and ``seq_len`` do not apply."""
        from transformers import DeiTConfig

        return self.model_class()(DeiTConfig(
            hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            intermediate_size=size["intermediate"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **DIGITS_VIT))
