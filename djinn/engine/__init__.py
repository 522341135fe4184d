"""How tokens are computed: models and their families, the paged KV pool, attention kernels,
the batch engine and the model service the kernel drives."""
