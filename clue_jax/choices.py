"""The named choices a config may make, in one jax-free place.

The config validator checks a run's values before anything heavy is imported,
and the modules that implement each choice (models, clue dropout, optimizer,
precision) check it again where it is used; both read the names from here, so
a new choice is added once.
"""

FLAVOURS = ("gpt2", "llama", "gemma2")  # models/config.py: one decoder config for each flavour
ARMS = ("plain", "random", "attention", "contrast", "rate_matched", "shuffled")  # clues/dropout.py methods
CONTRAST_ARMS = ("contrast", "rate_matched", "shuffled")  # rank tokens by d = s_large - s_small
SCHEDULES = ("cosine", "linear", "constant")  # train/optim.py learning-rate schedules
PRECISIONS = ("checkpoint", "mixed")  # models/precision.py training precisions
DTYPES = ("float32", "bfloat16", "float16")
WORLD_STYLES = ("repeated_name", "pronoun")  # data/bios.py world styles
