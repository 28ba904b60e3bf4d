"""The named choices the library's functions take, importable without torch, so that a config can be checked
against them before anything heavy loads."""

SAMPLERS = ("ddim", "dpm++")  # DDIM, DPM-Solver++ 2M
# LDM's "linear" schedule is linspace(√β0, √β1)², which diffusers calls scaled_linear.
NOISE_SCHEDULES = {"linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# A training stage's autocast: auto (bf16 on a GPU with native bf16, fp32 elsewhere), bf16 (also on CPU), fp32.
PRECISIONS = ("auto", "bf16", "fp32")
ATTENTION = ("auto", "sdpa", "math")  # auto: math on CPU, sdpa on GPU
WEIGHTS = ("ema", "raw")  # the averaged weights of a train_ldm output, or the last step's
LR_SCHEDULES = ("constant", "cosine", "linear")
