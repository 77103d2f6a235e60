//! Large in-memory arrays read at random: asks the kernel to back them with
//! 2 MiB pages where it can.
//!
//! Owns: the advice only (`madvise(MADV_HUGEPAGE)`); the memory stays the
//! allocator's. Must not: change what the memory holds or where it lives. A
//! lookup in a filter of hundreds of megabytes otherwise misses the TLB at
//! almost every probe, with 4 KiB pages (docs/BENCHMARKS.md, "huge pages").

/// Arrays smaller than this stay on ordinary pages: they fit the TLB anyway.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// A vector of `len` values made by `value`, its buffer advised onto huge
/// pages before it is first written (the kernel backs a page at its first
/// write, so advice after would come too late).
pub fn huge_vec<T>(len: usize, value: impl FnMut() -> T) -> Vec<T> {
    let mut vec = Vec::with_capacity(len);
    advise_huge_pages(vec.as_ptr() as usize, len * std::mem::size_of::<T>());
    vec.resize_with(len, value);
    vec
}

/// Advises the whole 4 KiB pages inside `[start, start + bytes)`.
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: usize, bytes: usize) {
    if bytes < HUGE_PAGE_BYTES {
        return;
    }
    const PAGE_BYTES: usize = 4096;
    let first = start.next_multiple_of(PAGE_BYTES);
    let end = (start + bytes) / PAGE_BYTES * PAGE_BYTES;
    if end <= first {
        return;
    }
    // SAFETY: the range lies inside an allocation this process owns (rounded
    // inwards to whole pages); MADV_HUGEPAGE changes only how the kernel backs
    // the pages, never their contents or mapping. A refusal (no THP) is fine:
    // the pages stay ordinary.
    unsafe {
        libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: usize, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_vec_holds_what_it_was_given() {
        let vec = huge_vec(3 << 20, || 7u8);
        assert_eq!(vec.len(), 3 << 20);
        assert!(vec.iter().all(|byte| *byte == 7));
        let small = huge_vec(5, || 1u64);
        assert_eq!(small, vec![1, 1, 1, 1, 1]);
    }
}
