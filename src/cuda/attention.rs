//! The attention family on the GPU (in progress): hand-written PTX from `kernels/gen_attention.py`.
