"""Helpers the tests share: tiny Hugging Face models of every supported family with awkward sizes, and the
environment of a growlib process a test starts."""

from __future__ import annotations

import os
import socket

import torch
import transformers as T

FAMILIES = ("bert", "gpt2", "llama", "vit", "roberta", "qwen2", "mistral", "gpt_neox", "opt", "deit")
#: the image families: example_inputs gives them pixels
IMAGE_CLASSES = (T.ViTForImageClassification, T.ViTModel, T.DeiTForImageClassification,
                 T.DeiTForImageClassificationWithTeacher, T.DeiTModel)
#: the families with grouped-query attention and RoPE: tiny_config takes kv_heads, head sizes must be even
GQA_FAMILIES = ("llama", "qwen2", "mistral")
VOCAB = 101
#: Families whose schema views are ordinary 2-D ones, as the first four families' are, so the Triton kernels see
#: nothing new in them: their tests parametrized by family and backend run on the PyTorch reference only
#: (tests/conftest.py's pytest_collection_modifyitems leaves out their interpreted Triton case, about a second
#: each), which keeps the suite's time in check.  GPT-NeoX keeps both backends: its head-split views take their own path through
#: apply_map (a task per head, re-indexed row maps).
REFERENCE_ONLY_FAMILIES = ("opt", "deit")


def tiny_config(family: str, hidden: int = 48, heads: int = 4, kv_heads: int | None = None,
                layers: int = 2, ffn: int = 70, tied: bool | None = None):
    """A small config: vocab 101 (prime), intermediate 70 (not a power of two), dropout off.  RoBERTa keeps its
    padding id 1, so its 40 position rows serve 38 tokens; Mistral slides a window of 7 positions in every layer,
    Qwen2 one of 6 in every layer but the first: the sequences of 11 and 17 tokens the tests use exceed both."""
    if family == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=40,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            **({} if tied is None else {"tie_word_embeddings": tied}))
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                            n_positions=40, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0,
                            **({} if tied is None else {"tie_word_embeddings": tied}))
    if family == "llama":
        return T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads or heads // 2,
                             intermediate_size=ffn, max_position_embeddings=40,
                             tie_word_embeddings=bool(tied))
    if family == "roberta":
        return T.RobertaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=40,
                               type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               **({} if tied is None else {"tie_word_embeddings": tied}))
    if family == "qwen2":
        return T.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads or heads // 2,
                             intermediate_size=ffn, max_position_embeddings=40, tie_word_embeddings=bool(tied),
                             use_sliding_window=True, sliding_window=6, max_window_layers=1)
    if family == "mistral":
        return T.MistralConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads or heads // 2,
                               intermediate_size=ffn, max_position_embeddings=40, tie_word_embeddings=bool(tied),
                               sliding_window=7)
    if family == "vit":
        return T.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=ffn, image_size=12, patch_size=4, num_labels=5,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "gpt_neox":
        # Pythia's layer: parallel residual, RoPE on a quarter of each head (head size 12: HF rotates
        # int(12 * 0.25) = 3 dimensions rounded up to the 4 its cos / sin tables hold), untied head by default
        return T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=40,
                               hidden_dropout=0.0, attention_dropout=0.0,
                               **({} if tied is None else {"tie_word_embeddings": tied}))
    if family == "opt":
        # 40 positions in a table of 42 rows (OPT's offset of 2); tied head by default
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           ffn_dim=ffn, max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
                           **({} if tied is None else {"tie_word_embeddings": tied}))
    if family == "deit":
        return T.DeiTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, image_size=12, patch_size=4, num_labels=5,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raise ValueError(family)


MODEL_CLASSES = {"bert": T.BertForMaskedLM, "gpt2": T.GPT2LMHeadModel, "llama": T.LlamaForCausalLM,
                 "vit": T.ViTForImageClassification, "roberta": T.RobertaForMaskedLM, "qwen2": T.Qwen2ForCausalLM,
                 "mistral": T.MistralForCausalLM, "gpt_neox": T.GPTNeoXForCausalLM, "opt": T.OPTForCausalLM,
                 "deit": T.DeiTForImageClassification}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **config):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, **config)).to(dtype).eval()
    _randomize(model, seed)
    return model


def _randomize(model, seed):
    """Give every parameter (norms and biases included) random values, so maps that confuse tensors show."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.2
            if name.endswith("weight") and p.dim() == 1:  # norm gains: keep them around 1
                noise += 1.0
            p.copy_(noise.to(p.dtype))


def example_inputs(model, batch: int = 3, seq: int = 11, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, IMAGE_CLASSES):
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=generator)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def free_port() -> int:
    """A TCP port no process listens on now: the rendezvous of the ranks a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_environment(tmp_path, fault: str | None = None) -> dict:
    """The environment of a growlib process a test starts: its own tokenizer cache, one thread (two processes
    on two cores), and no fault injected unless ``fault`` (growlib/train/faults.py) says one."""
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("GROWLIB_FAULT_INJECT", None)
    if fault:
        env["GROWLIB_FAULT_INJECT"] = fault
    return env


def tiny_run_experiment(tmp_path):
    """A 12-step GPT-2 experiment (2 layers x 32) on a small text file, its tokenizer cached in ``tmp_path``:
    a whole run in about a second, for the tests of run folders and exports."""
    import inspect

    from growlib.train.experiment import Experiment
    from growlib.train.config import TrainConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    config = TrainConfig(batch_size=2, seq_len=16, eval_every=4, eval_batches=1, warmup_steps=2)
    return Experiment(family="gpt2", size={"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64},
                      total_steps=12, config=config, data=str(corpus), vocab_size=300,
                      cache_dir=str(tmp_path / "cache"), device="cpu")
