"""The names the command line offers (model families, schedules, kernel ops), free of heavy imports so that
``growlib --help`` and the argument checks run before torch and transformers load.  The registries that
implement them (growlib.train.sizes, growlib.schedules, growlib.kernels.cases) take their names from here."""

FAMILIES = ("gpt2", "bert", "llama", "vit")
SCHEDULE_NAMES = ("baseline", "vcycle", "ode_multilevel", "mslt", "stack", "msg", "ligo")
KERNEL_OPS = ("structured_map", "kron_expand", "kron_expand_vector", "add_norm", "bias_activation",
              "gated_activation", "rope_split_qkv")
