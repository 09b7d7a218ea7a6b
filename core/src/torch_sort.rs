//! Exact replica of the permutation returned by PyTorch's CPU
//! `torch.sort(w, descending=..., stable=False)` / `torch.argsort(w, descending=...)`
//! for a 1-D contiguous float32 tensor, including the order of ties.
//!
//! PyTorch's CPU sort kernel (aten/src/ATen/native/cpu/SortingKernel.cpp, when the
//! x86-simd-sort path is not compiled in) runs libstdc++ `std::sort` over a zipped
//! (value, index) sequence, indices starting as `0..n`, comparing only the values with
//!
//! * `KeyValueCompDesc`: `a < b  <=>  (isnan(a) && !isnan(b)) || a > b`  (NaN first)
//! * `KeyValueCompAsc` : `a < b  <=>  (!isnan(a) && isnan(b)) || a < b`  (NaN last)
//!
//! `std::sort` is libstdc++'s introsort (`__introsort_loop` with `_S_threshold = 16`,
//! depth limit `2 * __lg(n)`, median-of-three `__move_median_to_first(first, first+1,
//! mid, last-1)`, `__unguarded_partition` around the pivot kept at `first`, heap sort
//! fallback via `__partial_sort(first, last, last)`, then `__final_insertion_sort`).
//! The code below mirrors libstdc++'s bits/stl_algo.h / stl_heap.h (checked against
//! the GCC 12 headers; torch 2.15 wheels are built with GCC 13.3, same algorithm) step
//! by step, except that `__unguarded_partition` is computed with branch-free bitmask
//! scans that provably perform the same swaps and return the same cut (see
//! [`block_partition`]; a unit test compares it with the literal loop).
//!
//! Verified exactly against torch 2.15.0 (CPU capabilities default/avx2/avx512 give the
//! same result). Caveat: a PyTorch build with `USE_X86_SIMD_SORT` enabled sorts
//! float32 with x86-simd-sort instead (stable=False, AVX2/AVX512) and orders ties
//! differently; this crate does not model that path.
//!
//! The selective functions ([`top_k_desc`], [`asc_range`]) run the same introsort but
//! only descend into sub-ranges that straddle a cut position. This is exact because
//! (1) every operation of `__introsort_loop` on a sub-range only permutes that
//! sub-range, and (2) the final insertion sort never moves an element past an element
//! that is not strictly greater than it; as every element of a partition's left side
//! is <= every element of its right side, the global final insertion sort acts on each
//! introsort leaf exactly like a guarded insertion sort of that leaf alone, and leaves
//! the heap-sorted ranges untouched. Hence the *set* of elements that ends up in a
//! range of positions is fixed as soon as the range is bounded by partition cuts.
//!
//! [`topk_largest_mask`] replicates the set chosen by `torch.topk(w, k)` (largest=True),
//! whose CPU kernel uses `std::partial_sort` / `std::nth_element` instead of `std::sort`
//! and therefore breaks ties differently from `argsort(descending=True)[:k]`.

// Written for smelt (session 13): mergekit 0.1.5 picks TIES / breadcrumbs
// elements with `torch.argsort` / `torch.sort` and SCE's with `torch.topk`,
// whose orders of equal values are these libstdc++ algorithms'. See
// `sparsify::TORCH_TIE_ORDER_BELOW`.

#[derive(Clone, Copy, Debug)]
struct E {
    v: f32,
    i: u32,
}

trait Order {
    fn lt(a: f32, b: f32) -> bool;
}

struct Desc;
struct Asc;
/// Same orders restricted to NaN-free inputs (one comparison instead of three).
struct DescNoNan;
struct AscNoNan;

impl Order for DescNoNan {
    #[inline(always)]
    fn lt(a: f32, b: f32) -> bool {
        a > b
    }
}

impl Order for AscNoNan {
    #[inline(always)]
    fn lt(a: f32, b: f32) -> bool {
        a < b
    }
}

impl Order for Desc {
    #[inline(always)]
    fn lt(a: f32, b: f32) -> bool {
        (a.is_nan() && !b.is_nan()) || a > b
    }
}

impl Order for Asc {
    #[inline(always)]
    fn lt(a: f32, b: f32) -> bool {
        (!a.is_nan() && b.is_nan()) || a < b
    }
}

const THRESHOLD: usize = 16; // libstdc++ _S_threshold

#[inline(always)]
fn lt<O: Order>(a: &E, b: &E) -> bool {
    O::lt(a.v, b.v)
}

/// std::__lg
#[inline]
fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

fn make_elems(w: &[f32]) -> Vec<E> {
    assert!(w.len() <= u32::MAX as usize, "length must fit in u32");
    w.iter()
        .enumerate()
        .map(|(i, &v)| E { v, i: i as u32 })
        .collect()
}

// ---------------------------------------------------------------- stl_algo.h pieces

#[inline]
fn move_median_to_first<O: Order>(a: &mut [E], result: usize, x: usize, y: usize, z: usize) {
    if lt::<O>(&a[x], &a[y]) {
        if lt::<O>(&a[y], &a[z]) {
            a.swap(result, y);
        } else if lt::<O>(&a[x], &a[z]) {
            a.swap(result, z);
        } else {
            a.swap(result, x);
        }
    } else if lt::<O>(&a[x], &a[z]) {
        a.swap(result, x);
    } else if lt::<O>(&a[y], &a[z]) {
        a.swap(result, z);
    } else {
        a.swap(result, y);
    }
}

/// __unguarded_partition(first, last, pivot), literally (reference implementation,
/// used to check [`block_partition`]). The pivot element sits at `pivot` (< first) and
/// is never moved by the loop, so its value can be cached.
#[allow(dead_code)]
fn unguarded_partition<O: Order>(
    a: &mut [E],
    mut first: usize,
    mut last: usize,
    pivot: usize,
) -> usize {
    let pv = a[pivot].v;
    loop {
        while O::lt(a[first].v, pv) {
            first += 1;
        }
        last -= 1;
        while O::lt(pv, a[last].v) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        a.swap(first, last);
        first += 1;
    }
}

/// Bit k set <=> element at base+k stops libstdc++'s left scan, i.e. !(x < pivot).
#[inline(always)]
fn left_stops<O: Order>(a: &[E], base: usize, len: usize, pv: f32) -> u64 {
    let blk = &a[base..base + len];
    let mut m = 0u64;
    for (k, e) in blk.iter().enumerate() {
        m |= ((!O::lt(e.v, pv)) as u64) << k;
    }
    m
}

/// Bit k set <=> element at base+k stops the right scan, i.e. !(pivot < x).
#[inline(always)]
fn right_stops<O: Order>(a: &[E], base: usize, len: usize, pv: f32) -> u64 {
    let blk = &a[base..base + len];
    let mut m = 0u64;
    for (k, e) in blk.iter().enumerate() {
        m |= ((!O::lt(pv, e.v)) as u64) << k;
    }
    m
}

/// Same result (same swaps, same returned cut) as
/// `__unguarded_partition(first + 1, last, first)`, computed without data-dependent
/// branches in the scans (BlockQuicksort-style bitmasks).
///
/// Let i_k be the k-th position (ascending, from first+1) of an element x with
/// !(x < pivot) and j_k the k-th position (descending, from last-1) of one with
/// !(pivot < x), both taken on the *original* contents. libstdc++ swaps i_k with j_k as
/// long as i_k < j_k and then returns min(i_{K+1}, j_K) (j_0 = last): positions it scans
/// before the pointers cross are untouched by earlier swaps, and once the left scan
/// reaches j_K (a swapped-in stopper) or the right scan reaches <= i_{K+1} it stops.
#[inline]
fn block_partition<O: Order>(a: &mut [E], first: usize, last: usize) -> usize {
    const B: usize = 64;
    let pv = a[first].v;
    let mut rpos = last; // j_K: every position >= rpos has been swapped (or is beyond the range)
    // left candidates: bits of lmask are positions lbase + bit; lnext = first unscanned
    let mut lnext = first + 1;
    let mut lbase = lnext;
    let mut lmask = 0u64;
    // right candidates: bits of rmask are positions rbase + bit; rnext = end of unscanned
    let mut rnext = last;
    let mut rbase = last;
    let mut rmask = 0u64;
    loop {
        // next left stopper i in [.., rpos)
        while lmask == 0 {
            if lnext >= rpos {
                return rpos;
            }
            let len = B.min(rpos - lnext);
            lbase = lnext;
            lmask = left_stops::<O>(a, lbase, len, pv);
            lnext += len;
        }
        let i = lbase + lmask.trailing_zeros() as usize;
        lmask &= lmask - 1;
        if i >= rpos {
            return rpos;
        }
        // next right stopper j in (i, rpos)
        while rmask == 0 {
            if rnext <= i + 1 {
                return i;
            }
            let len = B.min(rnext - (i + 1));
            rbase = rnext - len;
            rmask = right_stops::<O>(a, rbase, len, pv);
            rnext = rbase;
        }
        let top = 63 - rmask.leading_zeros() as usize;
        let j = rbase + top;
        rmask &= !(1u64 << top);
        if j <= i {
            return i;
        }
        a.swap(i, j);
        rpos = j;
    }
}

#[inline]
fn unguarded_partition_pivot<O: Order>(a: &mut [E], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first::<O>(a, first, first + 1, mid, last - 1);
    block_partition::<O>(a, first, last)
}

// ---------------------------------------------------------------- stl_heap.h pieces
// All heap functions work on the sub-slice h = [first, last).

#[inline]
fn push_heap<O: Order>(h: &mut [E], mut hole: usize, top: usize, value: E) {
    // C++: parent = (hole - 1) / 2; while (hole > top && comp(first + parent, value))
    while hole > top {
        let parent = (hole - 1) / 2;
        if !lt::<O>(&h[parent], &value) {
            break;
        }
        h[hole] = h[parent];
        hole = parent;
    }
    h[hole] = value;
}

#[inline]
fn adjust_heap<O: Order>(h: &mut [E], mut hole: usize, len: usize, value: E) {
    let top = hole;
    let mut second = hole;
    while second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if lt::<O>(&h[second], &h[second - 1]) {
            second -= 1;
        }
        h[hole] = h[second];
        hole = second;
    }
    if (len & 1) == 0 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        h[hole] = h[second - 1];
        hole = second - 1;
    }
    push_heap::<O>(h, hole, top, value);
}

fn make_heap<O: Order>(h: &mut [E]) {
    let len = h.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = h[parent];
        adjust_heap::<O>(h, parent, len, v);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn sort_heap<O: Order>(h: &mut [E]) {
    let mut last = h.len();
    while last > 1 {
        last -= 1;
        // __pop_heap(first, last, result = last)
        let v = h[last];
        h[last] = h[0];
        adjust_heap::<O>(h, 0, last, v);
    }
}

/// __partial_sort(first, last, last) = __heap_select (make_heap, empty loop) + __sort_heap.
fn heap_sort<O: Order>(h: &mut [E]) {
    HEAP_FALLBACKS.with(|c| c.set(c.get() + 1));
    make_heap::<O>(h);
    sort_heap::<O>(h);
}

thread_local! {
    static HEAP_FALLBACKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Number of introsort heap-sort fallbacks run so far on this thread (testing aid).
#[doc(hidden)]
pub fn heap_fallback_count() -> usize {
    HEAP_FALLBACKS.with(|c| c.get())
}

// ---------------------------------------------------------------- introsort

fn introsort_loop<O: Order>(a: &mut [E], first: usize, mut last: usize, mut depth: usize) {
    // recursion depth is bounded by the depth limit 2*lg(n) <= 64
    while last - first > THRESHOLD {
        if depth == 0 {
            heap_sort::<O>(&mut a[first..last]);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot::<O>(a, first, last);
        introsort_loop::<O>(a, cut, last, depth);
        last = cut;
    }
}

#[inline]
fn unguarded_linear_insert<O: Order>(a: &mut [E], mut last: usize) {
    let val = a[last];
    let mut next = last.wrapping_sub(1);
    while lt::<O>(&val, &a[next]) {
        a[last] = a[next];
        last = next;
        next = next.wrapping_sub(1);
    }
    a[last] = val;
}

fn insertion_sort<O: Order>(a: &mut [E], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if lt::<O>(&a[i], &a[first]) {
            let val = a[i];
            a.copy_within(first..i, first + 1); // move_backward
            a[first] = val;
        } else {
            unguarded_linear_insert::<O>(a, i);
        }
    }
}

fn final_insertion_sort<O: Order>(a: &mut [E]) {
    let n = a.len();
    if n > THRESHOLD {
        insertion_sort::<O>(a, 0, THRESHOLD);
        for i in THRESHOLD..n {
            unguarded_linear_insert::<O>(a, i);
        }
    } else {
        insertion_sort::<O>(a, 0, n);
    }
}

/// libstdc++ std::sort, literally.
fn std_sort<O: Order>(a: &mut [E]) {
    let n = a.len();
    if n != 0 {
        introsort_loop::<O>(a, 0, n, 2 * lg(n));
        final_insertion_sort::<O>(a);
    }
}

/// Runs std::sort's introsort but only on sub-ranges that strictly straddle one of
/// `cuts` (a cut c separates positions c-1 and c). Afterwards, for every range of
/// positions delimited by cuts, the set of elements in it equals the one std::sort gives.
fn std_sort_select<O: Order>(a: &mut [E], cuts: &[usize]) {
    let n = a.len();
    if n == 0 {
        return;
    }
    let straddles = |f: usize, l: usize| cuts.iter().any(|&c| f < c && c < l);
    // independent sub-ranges; processing order does not matter
    let mut stack: Vec<(usize, usize, usize)> = vec![(0, n, 2 * lg(n))];
    while let Some((first, mut last, mut depth)) = stack.pop() {
        if !straddles(first, last) {
            continue;
        }
        loop {
            if last - first <= THRESHOLD {
                // introsort leaf: the final insertion sort acts on it as a guarded
                // insertion sort of the leaf alone
                insertion_sort::<O>(a, first, last);
                break;
            }
            if depth == 0 {
                // fully sorted by the heap sort; the final insertion sort leaves it as is
                heap_sort::<O>(&mut a[first..last]);
                break;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot::<O>(a, first, last);
            if straddles(cut, last) {
                stack.push((cut, last, depth));
            }
            last = cut;
            if !straddles(first, last) {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- public API

fn has_nan(w: &[f32]) -> bool {
    // branch-free so that it vectorises
    w.chunks(1024)
        .any(|c| c.iter().fold(false, |acc, x| acc | x.is_nan()))
}

/// `torch.argsort(w, descending=True)` (stable=False) on CPU, as u32 indices.
pub fn argsort_desc(w: &[f32]) -> Vec<u32> {
    let mut a = make_elems(w);
    if has_nan(w) {
        std_sort::<Desc>(&mut a);
    } else {
        std_sort::<DescNoNan>(&mut a);
    }
    a.iter().map(|e| e.i).collect()
}

/// `torch.sort(w).indices` / `torch.argsort(w)` (ascending, stable=False) on CPU.
pub fn argsort_asc(w: &[f32]) -> Vec<u32> {
    let mut a = make_elems(w);
    if has_nan(w) {
        std_sort::<Asc>(&mut a);
    } else {
        std_sort::<AscNoNan>(&mut a);
    }
    a.iter().map(|e| e.i).collect()
}

/// Mask of the elements selected by `torch.argsort(w, descending=True)[:k]`.
/// `k >= w.len()` selects everything. Expected O(n).
pub fn top_k_desc(w: &[f32], k: usize) -> Vec<bool> {
    let n = w.len();
    if k == 0 || k >= n {
        return vec![k > 0; n];
    }
    let mut mask = vec![false; n];
    let mut a = make_elems(w);
    if has_nan(w) {
        std_sort_select::<Desc>(&mut a, &[k]);
    } else {
        std_sort_select::<DescNoNan>(&mut a, &[k]);
    }
    for e in &a[..k] {
        mask[e.i as usize] = true;
    }
    mask
}

/// Mask of the elements selected by `torch.sort(w).indices[lo:hi]` (ascending,
/// stable=False). `hi` is clamped to `w.len()`, an empty window gives an all-false
/// mask. Expected O(n).
pub fn asc_range(w: &[f32], lo: usize, hi: usize) -> Vec<bool> {
    let n = w.len();
    let hi = hi.min(n);
    let mut mask = vec![false; n];
    if lo >= hi {
        return mask;
    }
    if lo == 0 && hi == n {
        mask.iter_mut().for_each(|m| *m = true);
        return mask;
    }
    let mut a = make_elems(w);
    if has_nan(w) {
        std_sort_select::<Asc>(&mut a, &[lo, hi]);
    } else {
        std_sort_select::<AscNoNan>(&mut a, &[lo, hi]);
    }
    for e in &a[lo..hi] {
        mask[e.i as usize] = true;
    }
    mask
}

// ---------------------------------------------------------------- torch.topk

/// libstdc++ `std::__heap_select(first, middle, last, comp)` on `a`, literally:
/// `__make_heap(first, middle)`, then for each i in [middle, last) with
/// `comp(*i, *first)`: `__pop_heap(first, middle, i)` (the old top goes to i).
fn heap_select<O: Order>(a: &mut [E], first: usize, middle: usize, last: usize) {
    let (head, tail) = a[first..last].split_at_mut(middle - first);
    make_heap::<O>(head);
    let len = head.len();
    for x in tail.iter_mut() {
        if lt::<O>(x, &head[0]) {
            let v = *x;
            *x = head[0];
            adjust_heap::<O>(head, 0, len, v);
        }
    }
}

/// libstdc++ `std::__introselect(first, nth, last, 2 * __lg(n), comp)` (the body of
/// `std::nth_element`), literally except for the bitmask partition (same swaps/cut).
fn introselect<O: Order>(a: &mut [E], nth: usize) {
    let n = a.len();
    if n == 0 || nth >= n {
        return;
    }
    let (mut first, mut last, mut depth) = (0usize, n, 2 * lg(n));
    while last - first > 3 {
        if depth == 0 {
            HEAP_FALLBACKS.with(|c| c.set(c.get() + 1));
            heap_select::<O>(a, first, nth + 1, last);
            a.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot::<O>(a, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort::<O>(a, first, last);
}

/// `std::partial_sort(q, q + k, q + n, comp)` restricted to what decides the *set* of
/// its first k elements, i.e. `__heap_select` (the final `__sort_heap` only permutes
/// them). Reads `w` directly: during the scan, position i (>= k) still holds the
/// original element (i, w[i]), since `__pop_heap` only writes to already-scanned
/// positions. Returns the heap (the selected elements).
fn partial_sort_select<O: Order>(w: &[f32], k: usize) -> Vec<E> {
    let mut h = make_elems(&w[..k]);
    make_heap::<O>(&mut h);
    const B: usize = 64;
    let mut start = k;
    while start < w.len() {
        let len = B.min(w.len() - start);
        // candidates against the current top; the top only moves "up" (every later
        // top t' has !comp(t', t)), so a non-candidate never becomes one: recheck bits.
        let tv = h[0].v;
        let mut m = 0u64;
        for (j, &x) in w[start..start + len].iter().enumerate() {
            m |= (O::lt(x, tv) as u64) << j;
        }
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            let x = w[start + j];
            if O::lt(x, h[0].v) {
                adjust_heap::<O>(
                    &mut h,
                    0,
                    k,
                    E {
                        v: x,
                        i: (start + j) as u32,
                    },
                );
            }
        }
        start += len;
    }
    h
}

fn topk_set<O: Order>(w: &[f32], k: usize, mask: &mut [bool]) {
    let n = w.len();
    if k * 64 <= n {
        for e in partial_sort_select::<O>(w, k) {
            mask[e.i as usize] = true;
        }
    } else {
        let mut a = make_elems(w);
        introselect::<O>(&mut a, k - 1);
        for e in &a[..k] {
            mask[e.i as usize] = true;
        }
    }
}

/// Mask of the indices returned by PyTorch CPU `torch.topk(w, k, largest=True)`
/// (`sorted` True or False: sorting does not change the set) for a 1-D contiguous
/// float32 tensor, ties included. `k >= w.len()` selects everything.
///
/// Replicates aten/src/ATen/native/TopKImpl.h `topk_impl_loop`: a queue of
/// (value, index) pairs with comparator `(isnan(x) && !isnan(y)) || x > y`; if
/// `k * 64 <= n` it runs `std::partial_sort(q, q + k, q + n)` (set decided by
/// `__heap_select`), otherwise `std::nth_element(q, q + k - 1, q + n)`
/// (`__introselect`, depth limit `2 * __lg(n)`, heap-select fallback, final insertion
/// sort of <= 3 elements) followed by `std::sort(q, q + k - 1)`; the first k pairs are
/// returned. O(n + m log k) for the partial-sort path (m = heap replacements),
/// expected O(n) otherwise.
pub fn topk_largest_mask(w: &[f32], k: usize) -> Vec<bool> {
    let n = w.len();
    if k == 0 || k >= n {
        return vec![k > 0; n];
    }
    let mut mask = vec![false; n];
    assert!(n <= u32::MAX as usize, "length must fit in u32");
    if has_nan(w) {
        topk_set::<Desc>(w, k, &mut mask);
    } else {
        topk_set::<DescNoNan>(w, k, &mut mask);
    }
    mask
}

/// Literal reference for [`topk_largest_mask`] (testing aid): runs the libstdc++
/// algorithms on the full (value, index) array, including the final sorts, with the
/// literal `__unguarded_partition`, and returns the first k indices in torch's order
/// (= `torch.topk(w, k).indices`).
#[doc(hidden)]
pub fn topk_largest_indices_reference(w: &[f32], k: usize) -> Vec<u32> {
    let n = w.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut a = make_elems(w);
    if k * 64 <= n {
        heap_select::<Desc>(&mut a, 0, k, n);
        sort_heap::<Desc>(&mut a[..k]);
    } else {
        // __introselect with the literal partition
        let nth = k - 1;
        let (mut first, mut last, mut depth) = (0usize, n, 2 * lg(n));
        let mut done = false;
        while last - first > 3 {
            if depth == 0 {
                heap_select::<Desc>(&mut a, first, nth + 1, last);
                a.swap(first, nth);
                done = true;
                break;
            }
            depth -= 1;
            let mid = first + (last - first) / 2;
            move_median_to_first::<Desc>(&mut a, first, first + 1, mid, last - 1);
            let cut = unguarded_partition::<Desc>(&mut a, first + 1, last, first);
            if cut <= nth {
                first = cut;
            } else {
                last = cut;
            }
        }
        if !done {
            insertion_sort::<Desc>(&mut a, first, last);
        }
        std_sort::<Desc>(&mut a[..k - 1]);
    }
    a[..k].iter().map(|e| e.i).collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn block_partition_matches_literal() {
        let mut st = 0x243f6a8885a308d3u64;
        let mut rnd = move || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        for trial in 0..20000 {
            let n = 17 + (rnd() % [40u64, 200, 3000][trial % 3]) as usize;
            let levels = [1u64, 2, 3, 10, 1000][(rnd() % 5) as usize];
            let nan = trial % 7 == 0;
            let w: Vec<f32> = (0..n)
                .map(|_| {
                    if nan && rnd() % 5 == 0 {
                        f32::NAN
                    } else {
                        (rnd() % levels) as f32
                    }
                })
                .collect();
            for desc in [false, true] {
                let mut x = make_elems(&w);
                let mid = n / 2;
                if desc {
                    move_median_to_first::<Desc>(&mut x, 0, 1, mid, n - 1);
                } else {
                    move_median_to_first::<Asc>(&mut x, 0, 1, mid, n - 1);
                }
                let mut y = x.clone();
                let (c1, c2) = if desc {
                    (
                        unguarded_partition::<Desc>(&mut x, 1, n, 0),
                        block_partition::<Desc>(&mut y, 0, n),
                    )
                } else {
                    (
                        unguarded_partition::<Asc>(&mut x, 1, n, 0),
                        block_partition::<Asc>(&mut y, 0, n),
                    )
                };
                assert_eq!(c1, c2, "cut n={n} levels={levels}");
                assert!(
                    x.iter().zip(&y).all(|(p, q)| p.i == q.i),
                    "perm n={n} levels={levels}"
                );
            }
        }
    }

    #[test]
    fn tiny() {
        assert_eq!(argsort_desc(&[]), Vec::<u32>::new());
        assert_eq!(argsort_desc(&[1.0]), vec![0]);
        assert_eq!(argsort_desc(&[1.0, 3.0, 2.0]), vec![1, 2, 0]);
        assert_eq!(argsort_asc(&[1.0, 3.0, 2.0]), vec![0, 2, 1]);
        assert_eq!(argsort_desc(&[f32::NAN, 1.0, 2.0]), vec![0, 2, 1]);
        assert_eq!(argsort_asc(&[f32::NAN, 1.0, 2.0]), vec![1, 2, 0]);
    }
}
