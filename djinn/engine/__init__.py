"""How tokens are computed: models and their families, the paged KV pool, attention kernels,
the batch engine and the model service the kernel drives, and the weight-streaming contract
(``streaming``) streamer plugins implement."""
