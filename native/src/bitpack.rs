//! AutoGPTQ bit packing, free of Python.
//!
//! AutoGPTQ's layout is a little-endian bit stream of `bits`-wide codes cut into 32-bit words:
//! code k sits at bit `bits * k` of the stream. `qweight` runs that stream down each column (the
//! input dimension), `qzeros` along each row (the output dimension). For 2/4/8 bits a word holds
//! whole codes; for 3 bits codes straddle word boundaries, exactly as AutoGPTQ's loop produces
//! them. 32 codes always fill exactly `bits` words, so one formula serves every width.

use rayon::prelude::*;

pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

/// Columns handled per pass: keeps the destination tile (`words_per_unit` rows of it) in L1.
const COLUMN_TILE: usize = 2048;

/// An integer element that may hold a code.
pub trait Code: Copy + Send + Sync {
    /// The value as u32, or u32::MAX when it cannot be a code (negative, or wider than 32 bits),
    /// so that one unsigned comparison against the largest code catches every bad value.
    fn code(self) -> u32;
    /// The value for error messages.
    fn wide(self) -> i128;
}

macro_rules! unsigned_code {
    ($($t:ty),*) => {$(
        impl Code for $t {
            #[inline(always)]
            fn code(self) -> u32 { self as u32 }
            fn wide(self) -> i128 { self as i128 }
        }
    )*};
}
macro_rules! signed_code {
    ($($t:ty),*) => {$(
        impl Code for $t {
            #[inline(always)]
            fn code(self) -> u32 { if self < 0 { u32::MAX } else { self as u32 } }
            fn wide(self) -> i128 { self as i128 }
        }
    )*};
}
unsigned_code!(u8, u16, u32);
signed_code!(i8, i16, i32);

impl Code for u64 {
    #[inline(always)]
    fn code(self) -> u32 {
        self.min(u32::MAX as u64) as u32
    }
    fn wide(self) -> i128 {
        self as i128
    }
}
impl Code for i64 {
    #[inline(always)]
    fn code(self) -> u32 {
        if self < 0 {
            u32::MAX
        } else {
            self.min(u32::MAX as i64) as u32
        }
    }
    fn wide(self) -> i128 {
        self as i128
    }
}

/// The smallest whole block of the bit stream: `codes` codes fill exactly `words` words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unit {
    pub codes: usize,
    pub words: usize,
}

pub fn unit(bits: u32) -> Unit {
    let g = gcd(bits as usize, 32);
    Unit {
        codes: 32 / g,
        words: bits as usize / g,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A code that breaks the packing contract, with its flat (row-major) index.
#[derive(Debug, PartialEq, Eq)]
pub struct BadValue {
    pub index: usize,
    pub value: i128,
}

/// Packs `input` [rows, cols] (row-major) into `output` [rows * bits / 32, cols] along the rows.
/// `rows` must be a multiple of `unit(bits).codes` (checked by the caller).
pub fn pack_columns<T: Code>(
    input: &[T],
    cols: usize,
    bits: u32,
    output: &mut [u32],
) -> Result<(), BadValue> {
    match bits {
        2 => pack_columns_const::<T, 2>(input, cols, output),
        3 => pack_columns_const::<T, 3>(input, cols, output),
        4 => pack_columns_const::<T, 4>(input, cols, output),
        8 => pack_columns_const::<T, 8>(input, cols, output),
        _ => unreachable!("bits validated by the caller"),
    }
}

fn pack_columns_const<T: Code, const BITS: u32>(
    input: &[T],
    cols: usize,
    output: &mut [u32],
) -> Result<(), BadValue> {
    let u = unit(BITS);
    let max_code = (1u32 << BITS) - 1;
    if cols == 0 || output.is_empty() {
        return Ok(());
    }
    assert_eq!(
        input.len() / (u.codes * cols) * u.words * cols,
        output.len()
    );
    let seen = output
        .par_chunks_mut(u.words * cols)
        .zip(input.par_chunks(u.codes * cols))
        .map(|(dst, src)| pack_unit_dispatch::<T, BITS>(src, cols, dst))
        .reduce(|| 0, |a, b| a | b);
    if seen > max_code {
        return Err(first_bad(input, |c| c > max_code));
    }
    Ok(())
}

/// Picks the widest vector instructions the CPU has at run time: the extension is built for
/// baseline x86-64 (it travels between machines), yet the AVX2 copy of the same loop measured
/// 1.1-2x faster on one thread here (see the ignored test `avx2_versus_baseline_timing`).
fn pack_unit_dispatch<T: Code, const BITS: u32>(src: &[T], cols: usize, dst: &mut [u32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { pack_unit_avx2::<T, BITS>(src, cols, dst) };
        }
    }
    pack_unit::<T, BITS>(src, cols, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_unit_avx2<T: Code, const BITS: u32>(src: &[T], cols: usize, dst: &mut [u32]) -> u32 {
    pack_unit::<T, BITS>(src, cols, dst)
}

/// One unit of rows: `unit.codes` input rows into `unit.words` output rows. Returns the OR of
/// every code seen, which exceeds the largest code exactly when some value is out of range.
#[inline(always)]
fn pack_unit<T: Code, const BITS: u32>(src: &[T], cols: usize, dst: &mut [u32]) -> u32 {
    if BITS == 3 {
        return pack_unit_straddling::<T, BITS>(src, cols, dst);
    }
    // 2/4/8 bits: each output row takes 32/BITS whole input rows; build each word in one go.
    let per_word = (32 / BITS) as usize;
    let mut seen = 0u32;
    for (w, out_row) in dst.chunks_exact_mut(cols).enumerate() {
        let rows = &src[w * per_word * cols..(w + 1) * per_word * cols];
        seen |= match BITS {
            2 => pack_word_row::<T, 16, 2>(rows, out_row),
            4 => pack_word_row::<T, 8, 4>(rows, out_row),
            _ => pack_word_row::<T, 4, 8>(rows, out_row),
        };
    }
    seen
}

/// `N` input rows (each `out.len()` long, back to back in `rows`) into one row of words.
#[inline(always)]
fn pack_word_row<T: Code, const N: usize, const BITS: u32>(rows: &[T], out: &mut [u32]) -> u32 {
    let cols = out.len();
    assert_eq!(rows.len(), N * cols);
    let row: [&[T]; N] = std::array::from_fn(|k| &rows[k * cols..(k + 1) * cols]);
    let mut seen = 0u32;
    for (c, o) in out.iter_mut().enumerate() {
        let mut word = 0u32;
        for (k, r) in row.iter().enumerate() {
            // SAFETY: every row slice is exactly `cols` long (asserted above) and c < cols.
            let code = unsafe { r.get_unchecked(c) }.code();
            seen |= code;
            word |= code << (BITS as usize * k);
        }
        *o = word;
    }
    seen
}

/// 3 bits: codes straddle words, so go code row by code row, in column tiles kept in L1.
#[inline(always)]
fn pack_unit_straddling<T: Code, const BITS: u32>(src: &[T], cols: usize, dst: &mut [u32]) -> u32 {
    let u = unit(BITS);
    let mut seen = 0u32;
    dst.fill(0);
    let mut start = 0;
    while start < cols {
        let end = (start + COLUMN_TILE).min(cols);
        for k in 0..u.codes {
            let bit = BITS as usize * k;
            let (word, shift) = (bit / 32, (bit % 32) as u32);
            let row = &src[k * cols + start..k * cols + end];
            let low = &mut dst[word * cols + start..word * cols + end];
            for (d, &v) in low.iter_mut().zip(row) {
                let c = v.code();
                seen |= c;
                *d |= c << shift;
            }
            if shift + BITS > 32 {
                // Codes straddling into the next word (AutoGPTQ's order).
                let high = &mut dst[(word + 1) * cols + start..(word + 1) * cols + end];
                for (d, &v) in high.iter_mut().zip(row) {
                    *d |= v.code() >> (32 - shift);
                }
            }
        }
        start = end;
    }
    seen
}

/// Inverse of `pack_columns`: `input` [words_rows, cols] into `output` [words_rows * 32 / bits,
/// cols] as u8 codes.
pub fn unpack_columns(input: &[u32], cols: usize, bits: u32, output: &mut [u8]) {
    let u = unit(bits);
    if cols == 0 || output.is_empty() {
        return;
    }
    output
        .par_chunks_mut(u.codes * cols)
        .zip(input.par_chunks(u.words * cols))
        .for_each(|(dst, src)| unpack_unit_dispatch(src, cols, bits, dst));
}

fn unpack_unit_dispatch(src: &[u32], cols: usize, bits: u32, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { unpack_unit_avx2(src, cols, bits, dst) };
        }
    }
    unpack_unit(src, cols, bits, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_unit_avx2(src: &[u32], cols: usize, bits: u32, dst: &mut [u8]) {
    unpack_unit(src, cols, bits, dst)
}

#[inline(always)]
fn unpack_unit(src: &[u32], cols: usize, bits: u32, dst: &mut [u8]) {
    let u = unit(bits);
    let mask = (1u32 << bits) - 1;
    for k in 0..u.codes {
        let bit = bits as usize * k;
        let (word, shift) = (bit / 32, (bit % 32) as u32);
        let out_row = &mut dst[k * cols..(k + 1) * cols];
        let low = &src[word * cols..(word + 1) * cols];
        if shift + bits > 32 {
            let high = &src[(word + 1) * cols..(word + 2) * cols];
            for ((o, &l), &h) in out_row.iter_mut().zip(low).zip(high) {
                *o = (((l >> shift) | (h << (32 - shift))) & mask) as u8;
            }
        } else {
            for (o, &l) in out_row.iter_mut().zip(low) {
                *o = ((l >> shift) & mask) as u8;
            }
        }
    }
}

/// Packs each row of `codes` [rows, cols] along the row into [rows, cols * bits / 32] words.
/// `cols` must be a multiple of `unit(bits).codes`. Every value goes through `to_code`, which
/// returns None for a value that must be refused.
pub fn pack_rows<T: Code>(
    input: &[T],
    cols: usize,
    bits: u32,
    to_code: impl Fn(T) -> Option<u32>,
    output: &mut [u32],
) -> Result<(), BadValue> {
    let words_per_row = cols * bits as usize / 32;
    output.fill(0);
    if cols == 0 {
        return Ok(());
    }
    for (r, (row, out)) in input
        .chunks(cols)
        .zip(output.chunks_mut(words_per_row.max(1)))
        .enumerate()
    {
        for (j, &v) in row.iter().enumerate() {
            let c = to_code(v).ok_or(BadValue {
                index: r * cols + j,
                value: v.wide(),
            })?;
            let bit = bits as usize * j;
            let (word, shift) = (bit / 32, (bit % 32) as u32);
            out[word] |= c << shift;
            if shift + bits > 32 {
                out[word + 1] |= c >> (32 - shift);
            }
        }
    }
    Ok(())
}

/// Inverse of `pack_rows`: [rows, cols * bits / 32] words into [rows, cols] codes.
pub fn unpack_rows(input: &[u32], cols: usize, bits: u32, output: &mut [u32]) {
    let words_per_row = cols * bits as usize / 32;
    if cols == 0 || words_per_row == 0 {
        return;
    }
    let mask = (1u32 << bits) - 1;
    for (row, out) in input.chunks(words_per_row).zip(output.chunks_mut(cols)) {
        for (j, o) in out.iter_mut().enumerate() {
            let bit = bits as usize * j;
            let (word, shift) = (bit / 32, (bit % 32) as u32);
            let mut v = row[word] >> shift;
            if shift + bits > 32 {
                v |= row[word + 1] << (32 - shift);
            }
            *o = v & mask;
        }
    }
}

/// Row-major [rows, cols] into row-major [cols, rows], in cache-sized tiles.
pub fn transpose(input: &[u32], rows: usize, cols: usize, output: &mut [u32]) {
    const TILE: usize = 64;
    if rows == 0 || cols == 0 {
        return;
    }
    output
        .par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(t, dst)| {
            let c0 = t * TILE;
            let width = dst.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                for r in r0..r1 {
                    let src = &input[r * cols + c0..r * cols + c0 + width];
                    for (cc, &v) in src.iter().enumerate() {
                        dst[cc * rows + r] = v;
                    }
                }
            }
        });
}

fn first_bad<T: Code>(input: &[T], bad: impl Fn(u32) -> bool) -> BadValue {
    let index = input
        .iter()
        .position(|v| bad(v.code()))
        .expect("a bad value was seen");
    BadValue {
        index,
        value: input[index].wide(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AutoGPTQ's own per-bit-width loop, transcribed as the stream definition: bit `bits*k`.
    fn reference_pack(input: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u32> {
        let out_rows = rows * bits as usize / 32;
        let mut out = vec![0u32; out_rows * cols];
        for c in 0..cols {
            for r in 0..rows {
                let v = input[r * cols + c] as u64;
                let bit = bits as usize * r;
                let (w, s) = (bit / 32, bit % 32);
                let wide = v << s;
                out[w * cols + c] |= wide as u32;
                if w + 1 < out_rows {
                    out[(w + 1) * cols + c] |= (wide >> 32) as u32;
                }
            }
        }
        out
    }

    #[test]
    fn pack_matches_reference_and_round_trips() {
        for &bits in &SUPPORTED_BITS {
            let u = unit(bits);
            for &(units, cols) in &[(1usize, 1usize), (3, 5), (2, 2100), (5, 4099)] {
                let rows = units * u.codes;
                let input: Vec<u8> = (0..rows * cols)
                    .map(|i| (((i * 2654435761usize) >> 7) as u32 & ((1u32 << bits) - 1)) as u8)
                    .collect();
                let mut packed = vec![0u32; rows * bits as usize / 32 * cols];
                pack_columns(&input, cols, bits, &mut packed).unwrap();
                assert_eq!(
                    packed,
                    reference_pack(&input, rows, cols, bits),
                    "bits {bits}"
                );
                let mut back = vec![0u8; rows * cols];
                unpack_columns(&packed, cols, bits, &mut back);
                assert_eq!(back, input);
            }
        }
    }

    #[test]
    fn out_of_range_reports_first_bad_index() {
        let mut input = vec![1u8; 8 * 3];
        input[10] = 16;
        input[20] = 200;
        let mut out = vec![0u32; 3];
        assert_eq!(
            pack_columns(&input, 3, 4, &mut out),
            Err(BadValue {
                index: 10,
                value: 16
            })
        );
        let neg = vec![-1i32; 8];
        let mut out = vec![0u32; 1];
        assert_eq!(
            pack_columns(&neg, 1, 4, &mut out),
            Err(BadValue {
                index: 0,
                value: -1
            })
        );
    }

    #[test]
    fn rows_round_trip_three_bits() {
        let cols = 64;
        let input: Vec<u32> = (0..cols as u32 * 2).map(|i| (i * 5) % 8).collect();
        let mut packed = vec![0u32; 2 * 6];
        pack_rows(&input, cols, 3, Some, &mut packed).unwrap();
        let mut back = vec![0u32; input.len()];
        unpack_rows(&packed, cols, 3, &mut back);
        assert_eq!(back, input);
    }

    /// `cargo test --release -- --ignored --nocapture`: what the AVX2 copy of the loop buys.
    #[test]
    #[ignore]
    fn avx2_versus_baseline_timing() {
        let (rows, cols) = (4096usize, 11008usize);
        let input: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 16) as u8).collect();
        let mut out = vec![0u32; rows / 8 * cols];
        let time = |f: &dyn Fn(&[u8], &mut [u32])| {
            let mut out = vec![0u32; rows / 8 * cols];
            (0..7)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f(&input, &mut out);
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        let single_thread = |avx2: bool| {
            move |src: &[u8], dst: &mut [u32]| {
                for (d, s) in dst.chunks_mut(cols).zip(src.chunks(8 * cols)) {
                    if avx2 {
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            pack_unit_avx2::<u8, 4>(s, cols, d);
                        }
                    } else {
                        pack_unit::<u8, 4>(s, cols, d);
                    }
                }
            }
        };
        pack_columns(&input, cols, 4, &mut out).unwrap();
        let baseline = time(&single_thread(false));
        let avx2 = time(&single_thread(true));
        println!(
            "1 thread: baseline {baseline:.4} s, avx2 {avx2:.4} s, x{:.2}",
            baseline / avx2
        );
    }

    #[test]
    fn transpose_is_exact() {
        let (rows, cols) = (70, 131);
        let input: Vec<u32> = (0..(rows * cols) as u32).collect();
        let mut out = vec![0u32; rows * cols];
        transpose(&input, rows, cols, &mut out);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(out[c * rows + r], input[r * cols + c]);
            }
        }
    }
}
