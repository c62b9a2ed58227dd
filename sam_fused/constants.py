"""Constants shared by the Python planning code, the Triton kernels and the C++ kernels.

``csrc/sam_constants.h`` mirrors these values for the native kernels; ``tests/test_layout.py``
reads that header and fails when the two disagree.
"""

# Update kinds of the restore + update pass (an int argument of both kernel families).
OPT_RESTORE = 0  # w = backup
OPT_SGD = 1  # torch.optim.SGD
OPT_ADAM = 2  # torch.optim.Adam / AdamW, without amsgrad

# scale = rho / (norm + NORM_EPS), as the common SAM implementations write it.
NORM_EPS = 1e-12

# Columns of a pointer-table row (Triton): numel, then the addresses of
# param, grad, backup (or the update's source), state 1, state 2.
COL_NUMEL = 0
COL_PARAM = 1
COL_GRAD = 2
COL_BACKUP = 3
COL_STATE1 = 4
COL_STATE2 = 5
NCOL = 6

# Elements per chunk (one program of the Triton elementwise kernels; one CUDA block) and per
# inner Triton iteration.
CHUNK = 65536
BLOCK = 4096
