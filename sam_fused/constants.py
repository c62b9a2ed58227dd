"""Constants shared by the Python planning code, the Triton kernels and the C++ kernels.

``csrc/sam_constants.h`` mirrors these values for the native kernels;
``tests/test_plan.py::test_constants_match_the_native_header`` reads that header and fails when
the two disagree.
"""

# Update kinds of the restore + update pass (an int argument of both kernel families).
OPT_RESTORE = 0  # w = backup
OPT_SGD = 1  # torch.optim.SGD
OPT_ADAM = 2  # torch.optim.Adam / AdamW, without amsgrad

# scale = rho / (norm + NORM_EPS), as the common SAM implementations write it.
NORM_EPS = 1e-12

# Columns of a pointer-table row (Triton): numel, then the addresses of
# param, grad, backup (or the update's source), state 1, state 2, and aux (GSAM's saved first
# gradient, LookSAM's g_v; 0 for FusedSAM).
COL_NUMEL = 0
COL_PARAM = 1
COL_GRAD = 2
COL_BACKUP = 3
COL_STATE1 = 4
COL_STATE2 = 5
COL_AUX = 6
NCOL = 7

# Elements per chunk of the pointer tables (and per CUDA block of the native kernels), and the
# Triton kernels' default block (per inner iteration). The Triton launch itself (program-chunk,
# block, warps, grid) comes from sam_fused/kernels/launch_configs.json; a program-chunk divides CHUNK.
CHUNK = 65536
BLOCK = 4096

# The folded scalars of the restore + update pass, in the order both kernel families take them
# (update_scalars.UpdateScalars.scalars() computes them once on the host; csrc/sam_math.h's UpdateScalars mirrors
# the order). SGD: d = g * sign + l2 * w; m = m * keep + coef * d; d = nesterov ? d + momentum * m
# : m; w -= lr * d. Adam: d = g * sign + l2 * w; w *= decay; m += one_minus_beta1 * (d - m);
# v = v * beta2 + one_minus_beta2 * d^2; w -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps).
UPDATE_SCALARS = ("sign", "lr", "l2", "decay", "momentum", "keep", "coef", "one_minus_beta1", "beta2",
                  "one_minus_beta2", "eps", "step_size", "bias_correction2_sqrt")
