//! Packing orders: gpt-oss nibble order and GGUF `block_mxfp4`.

mod common;

use common::{e2m1_value, e8m0_value, element, random_matrix, rng};
use fp4::layout::{block_from_gguf_qs, block_to_gguf_qs};
use fp4::{from_gguf, pack_codes, to_gguf, unpack_codes, Fp4Error, MxMatrix, GGUF_BLOCK_BYTES};
use rand::Rng;

#[test]
fn pack_and_unpack_codes() {
    assert_eq!(pack_codes(&[0x1, 0x2, 0xF, 0x8]), vec![0x21, 0x8F]);
    assert_eq!(unpack_codes(&[0x21, 0x8F]), vec![0x1, 0x2, 0xF, 0x8]);
    // Odd length: the last high nibble is 0. High bits of a code are ignored.
    assert_eq!(pack_codes(&[0x7, 0x3, 0x5]), vec![0x37, 0x05]);
    assert_eq!(pack_codes(&[0xF7, 0xA3]), vec![0x37]);
    assert!(pack_codes(&[]).is_empty() && unpack_codes(&[]).is_empty());
    let mut r = rng(1);
    for _ in 0..50 {
        let n = 2 * r.random_range(0..100);
        let codes: Vec<u8> = (0..n).map(|_| r.random_range(0..16)).collect();
        let packed = pack_codes(&codes);
        assert_eq!(packed.len(), n / 2);
        assert_eq!(unpack_codes(&packed), codes);
        // Element 2j is the low nibble of byte j, element 2j+1 the high one.
        for (j, &b) in packed.iter().enumerate() {
            assert_eq!((b & 15, b >> 4), (codes[2 * j], codes[2 * j + 1]));
        }
        let bytes: Vec<u8> = (0..n / 2).map(|_| r.random()).collect();
        assert_eq!(pack_codes(&unpack_codes(&bytes)), bytes);
    }
}

/// Decodes GGUF `block_mxfp4` data per element, straight from the llama.cpp definition
/// (`dequantize_row_mxfp4`: `y[j] = kvalues[qs[j] & 0xf] · d`, `y[j + 16] = kvalues[qs[j] >> 4] · d`).
fn gguf_element(bytes: &[u8], k: usize, r: usize, c: usize) -> f64 {
    let blk = &bytes[(r * k / 32 + c / 32) * GGUF_BLOCK_BYTES..][..GGUF_BLOCK_BYTES];
    let (e, qs) = (blk[0], &blk[1..]);
    let j = c % 32;
    let code = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    e2m1_value(code) * e8m0_value(e).unwrap()
}

#[test]
fn gguf_round_trip_is_lossless_and_decodes_the_same() {
    let mut r = rng(2);
    for (rows, k) in [(1, 32), (3, 96), (17, 2880 / 10), (40, 64), (0, 32), (5, 0)] {
        let m = random_matrix(&mut r, rows, k, 0..=254);
        let w = m.view().unwrap();
        let g = to_gguf(w);
        assert_eq!(g.len(), rows * k / 32 * 17);
        for row in 0..rows {
            for c in 0..k {
                assert_eq!(
                    gguf_element(&g, k, row, c),
                    element(&m, row, c),
                    "({row}, {c})"
                );
            }
        }
        // Every block: the scale byte leads, unchanged.
        for (b, blk) in g.chunks_exact(GGUF_BLOCK_BYTES).enumerate() {
            assert_eq!(blk[0], m.scales[b]);
        }
        assert_eq!(from_gguf(&g, rows, k).unwrap(), m);
    }
    // GGUF → ours → GGUF on arbitrary (non-NaN) bytes.
    let (rows, k) = (9, 256);
    let mut g: Vec<u8> = (0..rows * k / 32 * 17).map(|_| r.random()).collect();
    for blk in g.chunks_exact_mut(17) {
        blk[0] = r.random_range(0..=254);
    }
    let m = from_gguf(&g, rows, k).unwrap();
    assert_eq!(to_gguf(m.view().unwrap()), g);
}

#[test]
fn gguf_block_permutation() {
    // Element i has code i % 16; the first 16 elements use codes 0..15 and so do the last 16.
    let ours = pack_codes(&(0..32).map(|i| (i % 16) as u8).collect::<Vec<_>>());
    let ours: [u8; 16] = ours.try_into().unwrap();
    let qs = block_to_gguf_qs(&ours);
    for (j, &q) in qs.iter().enumerate() {
        assert_eq!(
            q,
            (j as u8) | ((j as u8) << 4),
            "qs[{j}]: element j low, element j+16 high"
        );
    }
    assert_eq!(block_from_gguf_qs(&qs), ours);
    // A single nonzero element lands where the GGUF definition says.
    for i in 0..32 {
        let mut codes = [0u8; 32];
        codes[i] = 0xB;
        let ours: [u8; 16] = pack_codes(&codes).try_into().unwrap();
        let qs = block_to_gguf_qs(&ours);
        let (byte, nib) = (i % 16, i / 16);
        for (j, &q) in qs.iter().enumerate() {
            let want = if j == byte { 0xB << (4 * nib) } else { 0 };
            assert_eq!(q, want, "element {i}, qs[{j}]");
        }
    }
}

#[test]
fn gguf_errors_are_typed() {
    let g = vec![127u8; 2 * 3 * 17];
    assert_eq!(
        from_gguf(&g, 2, 48).unwrap_err(),
        Fp4Error::KNotMultipleOfBlock { k: 48 }
    );
    assert_eq!(
        from_gguf(&g[..g.len() - 1], 2, 96).unwrap_err(),
        Fp4Error::LengthMismatch {
            what: "GGUF block_mxfp4 bytes",
            expected: 102,
            got: 101
        }
    );
    assert!(matches!(
        from_gguf(&g, 3, 96),
        Err(Fp4Error::LengthMismatch {
            expected: 153,
            got: 102,
            ..
        })
    ));
    assert!(matches!(
        from_gguf(&g, usize::MAX, 64),
        Err(Fp4Error::LengthMismatch { .. })
    ));
    let mut bad = g.clone();
    bad[4 * 17] = 0xFF; // row 1, block 1
    assert_eq!(
        from_gguf(&bad, 2, 96).unwrap_err(),
        Fp4Error::NanScale { row: 1, block: 1 }
    );
    // 0xFF inside qs is just codes.
    let mut fine = g;
    fine[4 * 17 + 5] = 0xFF;
    let m: MxMatrix = from_gguf(&fine, 2, 96).unwrap();
    assert!(m.view().is_ok());
}
