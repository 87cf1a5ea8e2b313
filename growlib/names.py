"""The names the command line offers (model families, schedules, kernel ops, growth methods), free of heavy imports
so that ``growlib --help`` and the argument checks run before torch and transformers load.  The registries that
implement them (growlib.models, growlib.schedules, growlib.kernels.cases, growlib.operators) take their names from
here or are checked against them (tests/test_cli_fast.py)."""

FAMILIES = ("gpt2", "bert", "llama", "vit", "roberta", "qwen2", "mistral", "gpt_neox", "opt", "deit")
SCHEDULE_NAMES = ("baseline", "vcycle", "ode_multilevel", "mslt", "stack", "msg", "ligo")
KERNEL_OPS = ("structured_map", "kron_expand", "kron_expand_vector", "add_norm", "bias_activation",
              "gated_activation", "rope_split_qkv")
DEPTH_METHODS = ("stack", "interleave", "copy_top")
WIDTH_METHODS = ("net2net", "bert2bert_fpi", "bert2bert_aki", "hypercloning")
