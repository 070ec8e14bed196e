//! Property-testing support (feature `testing`): proptest strategies for the inputs that break
//! quantizers and kernels, and a differential harness against [`crate::reference`].
