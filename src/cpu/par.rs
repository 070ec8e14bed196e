//! Parallel loops over disjoint output chunks: rayon when the feature is on, a plain loop
//! otherwise. Each chunk is computed independently, so results never depend on thread count.

/// Calls `f(chunk_index, chunk)` for consecutive chunks of `chunk_len` elements of `out`.
pub(crate) fn for_each_chunk<T: Send>(out: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let chunk_len = chunk_len.max(1);
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c));
    }
    #[cfg(not(feature = "rayon"))]
    {
        out.chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// How many units of `unit_bytes` make a chunk of about 64 KiB (at least one).
pub(crate) fn units_per_chunk(unit_bytes: usize) -> usize {
    const TARGET: usize = 64 * 1024;
    (TARGET / unit_bytes.max(1)).max(1)
}

/// The threads [`for_each_chunk`] shares work among.
pub(crate) fn threads() -> usize {
    #[cfg(feature = "rayon")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "rayon"))]
    {
        1
    }
}
