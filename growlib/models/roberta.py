"""RoBERTa (post-LN encoder, BERT's layers): RobertaForMaskedLM and RobertaModel.

Its layers, embeddings and pooler are BERT's under the prefix ``roberta.``; what differs is the masked-LM head
(``lm_head``: dense, GELU, ``layer_norm``, ``decoder`` with ``lm_head.bias``) and the positions: RoBERTa
numbers them from ``pad_token_id + 1`` (a padding token takes position ``pad_token_id``), so a table of
``max_position_embeddings`` rows serves ``max_position_embeddings - pad_token_id - 1`` tokens."""

from __future__ import annotations

from .base import Adapter
from .bert import BertAdapter

#: growlib's tokenizers put their special tokens first, in this order (growlib.train.data.SPECIAL_TOKENS).
_PAD_ID, _BOS_ID, _EOS_ID = 0, 2, 3


class RobertaAdapter(BertAdapter):
    family = "roberta"
    modeling_module = "transformers.models.roberta.modeling_roberta"
    model_class_names = ("RobertaForMaskedLM", "RobertaModel")
    layer_class_name = "RobertaLayer"
    display_name = "RoBERTa"
    encoder_prefix = "roberta"

    demo_model = Adapter.demo_model  # not offered by growlib demo

    def mlm_head_specs(self, tied, head="lm_head.", transform="dense", norm_name="layer_norm"):
        return super().mlm_head_specs(tied, head, transform, norm_name)

    def max_seq_len(self, config) -> int:
        return config.max_position_embeddings - (config.pad_token_id or 0) - 1

    def training_model(self, size, vocab_size, seq_len):
        """Padding, begin and end ids are growlib's tokenizer's (not RoBERTa's 1, 0, 2: with pad_token_id 1 its
        mask token would be taken for padding), and the position table leaves room for ``seq_len`` tokens after
        the offset."""
        from transformers import RobertaConfig

        return self.model_class()(RobertaConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len + _PAD_ID + 1, type_vocab_size=1,
            pad_token_id=_PAD_ID, bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
