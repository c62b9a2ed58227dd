"""Training stacks: each module imports its library lazily (only when the module itself is imported),
so ``import sam_fused`` never needs them."""
