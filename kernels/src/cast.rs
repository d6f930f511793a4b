//! fp32 <-> bf16 casts for the optional lossy checkpoint tier.
//!
//! Design note. bf16 is the top half of an fp32, so the cast down is a rounding of the low 16
//! bits and the cast up is exact. Rounding is to nearest, ties to even, done in integer
//! arithmetic on the raw bits (add 0x7fff plus the kept half's lowest bit, then truncate): this
//! handles subnormals and the overflow of the largest finites to infinity with no special case,
//! and the GPU twin runs the same integer steps, so both give the same bits without relying on
//! a library intrinsic whose NaN handling differs between versions. NaNs are the one special
//! case: rounding could carry a NaN's payload into the exponent (or clear it, making an
//! infinity), so a NaN keeps its sign and top payload bits and gets the quiet bit set.

/// The quiet bit of a bf16 NaN (the top mantissa bit).
const BF16_QUIET: u16 = 0x0040;

/// fp32 to bf16 bits, rounding to nearest even; a NaN stays a (quiet) NaN of the same sign.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return (bits >> 16) as u16 | BF16_QUIET;
    }
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// bf16 bits to fp32: exact.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Element-wise [`f32_to_bf16`]. Panics if the lengths differ.
pub fn f32_to_bf16_slice(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "cast needs equal lengths");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(*s);
    }
}

/// Element-wise [`bf16_to_f32`]. Panics if the lengths differ.
pub fn bf16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "cast needs equal lengths");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Independent reference: pick between the two bf16 neighbours by exact distance in f64
    /// (both neighbours and `x` are exact there), ties to the even one.
    fn reference(x: f32) -> u16 {
        let bits = x.to_bits();
        let down = (bits >> 16) as u16;
        if bits & 0xffff == 0 {
            return down;
        }
        let up = down + 1;
        let xd = x as f64;
        let (lo, hi) = (bf16_to_f32(down) as f64, bf16_to_f32(up) as f64);
        let (dl, dh) = ((xd - lo).abs(), (hi - xd).abs());
        // `up` of the largest finite is infinity: its distance is that of 2^128, the next
        // binade's start, which is how IEEE rounding decides overflow.
        let dh = if bf16_to_f32(up).is_infinite() { (2f64.powi(128) * xd.signum() - xd).abs() } else { dh };
        if dl < dh || (dl == dh && down & 1 == 0) {
            down
        } else {
            up
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
        assert_eq!(f32_to_bf16(0.0), 0x0000);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        // Ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7; even is 1.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between odd 0x3f81 and even 0x3f82.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        // The largest finite fp32 is past bf16's largest finite plus half an ulp: infinity.
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        // The smallest subnormal rounds to zero; a subnormal tie rounds to even.
        assert_eq!(f32_to_bf16(f32::from_bits(1)), 0);
        assert_eq!(f32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002);
    }

    #[test]
    fn nans_stay_quiet_nans_with_their_sign() {
        for bits in [0x7fc0_0000u32, 0x7f80_0001, 0xff80_0001, 0x7fbf_ffff, 0xffff_ffff, 0x7f80_ffff] {
            let h = f32_to_bf16(f32::from_bits(bits));
            assert!(bf16_to_f32(h).is_nan(), "{bits:#x} -> {h:#x}");
            assert_eq!(h & BF16_QUIET, BF16_QUIET);
            assert_eq!(h >> 15, (bits >> 31) as u16);
        }
    }

    #[test]
    fn slices_cast_element_wise() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013_7).collect();
        let mut h = vec![0u16; x.len()];
        f32_to_bf16_slice(&x, &mut h);
        let mut back = vec![0f32; x.len()];
        bf16_to_f32_slice(&h, &mut back);
        for ((x, h), b) in x.iter().zip(&h).zip(&back) {
            assert_eq!(*h, f32_to_bf16(*x));
            assert_eq!(b.to_bits(), (*h as u32) << 16);
            assert!((x - b).abs() <= x.abs() / 256.0);
        }
    }

    proptest! {
        #[test]
        fn rounds_to_nearest_even(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            prop_assume!(!x.is_nan());
            prop_assert_eq!(f32_to_bf16(x), reference(x));
        }

        #[test]
        fn bf16_round_trips_exactly(h in any::<u16>()) {
            let x = bf16_to_f32(h);
            if x.is_nan() {
                prop_assert!(bf16_to_f32(f32_to_bf16(x)).is_nan());
            } else {
                prop_assert_eq!(f32_to_bf16(x), h);
            }
        }
    }
}
