//! Block formats against their definitions: hand-built blocks, ggml-exact quantizers,
//! and dequantization compared with values produced once by gguf-py (`gguf.quants`),
//! committed here as literals so the tests need no Python.
// The literals are exact f32 values printed by Python as f64.
#![allow(clippy::excessive_precision)]

use caldera_format::quant::{
    dequantize, quantize, supports_dequantize, supports_quantize, vec_dot, QuantizedActs,
};
use caldera_format::GgmlType;

fn fnv(vals: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in vals {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn fnv_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.type_size() * ty.block_size();
    let mut out = vec![0.0; n];
    dequantize(ty, bytes, &mut out).unwrap();
    out
}

fn f16b(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

const KV_NL: [f32; 16] = [
    -127., -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.,
];
const KV_MX: [f32; 16] = [
    0., 1., 2., 3., 4., 6., 8., 12., 0., -1., -2., -3., -4., -6., -8., -12.,
];

#[test]
fn hand_built_legacy_blocks() {
    let nib: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
    // Q4_0: d = 0.5, element i = low nibble (i), element 16+i = high nibble (15-i), minus 8.
    let b = [&f16b(0.5)[..], &nib].concat();
    let y = deq(GgmlType::Q4_0, &b);
    for i in 0..16 {
        assert_eq!(y[i], 0.5 * (i as f32 - 8.0));
        assert_eq!(y[16 + i], 0.5 * (7.0 - i as f32));
    }
    // Q4_1: d = 0.25, m = -1.
    let b = [&f16b(0.25)[..], &f16b(-1.0), &nib].concat();
    let y = deq(GgmlType::Q4_1, &b);
    for i in 0..16 {
        assert_eq!(y[i], 0.25 * i as f32 - 1.0);
        assert_eq!(y[16 + i], 0.25 * (15 - i) as f32 - 1.0);
    }
    // Q5_0: d = 1, qh bits 0 and 31, nibbles 3 (low) / 5 (high).
    let b = [&f16b(1.0)[..], &0x8000_0001u32.to_le_bytes(), &[0x53u8; 16]].concat();
    let y = deq(GgmlType::Q5_0, &b);
    assert_eq!(y[0], 3.0);
    assert!(y[1..16].iter().all(|&v| v == -13.0));
    assert!(y[16..31].iter().all(|&v| v == -11.0));
    assert_eq!(y[31], 5.0);
    // Q5_1: d = 2, m = 0.5, qh bit 16, nibbles 1 / 2.
    let b = [
        &f16b(2.0)[..],
        &f16b(0.5),
        &0x0001_0000u32.to_le_bytes(),
        &[0x21u8; 16],
    ]
    .concat();
    let y = deq(GgmlType::Q5_1, &b);
    assert!(y[..16].iter().all(|&v| v == 2.5));
    assert_eq!(y[16], 36.5);
    assert!(y[17..].iter().all(|&v| v == 4.5));
    // Q8_0: d = 0.125, q = i - 16.
    let qs: Vec<u8> = (0..32).map(|i| (i as i8 - 16) as u8).collect();
    let y = deq(GgmlType::Q8_0, &[&f16b(0.125)[..], &qs].concat());
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, 0.125 * (i as f32 - 16.0));
    }
    // Q8_1: d = 0.125, s ignored.
    let y = deq(
        GgmlType::Q8_1,
        &[&f16b(0.125)[..], &f16b(-64.0), &qs].concat(),
    );
    assert_eq!(y[0], -2.0);
    // IQ4_NL: d = 0.5, both nibbles i.
    let same: Vec<u8> = (0..16u8).map(|i| i | (i << 4)).collect();
    let y = deq(GgmlType::IQ4_NL, &[&f16b(0.5)[..], &same].concat());
    for i in 0..16 {
        assert_eq!(y[i], 0.5 * KV_NL[i]);
        assert_eq!(y[16 + i], 0.5 * KV_NL[i]);
    }
    // MXFP4: e = 130 → scale 2^(130-128) = 4 on the doubled E2M1 table.
    let y = deq(GgmlType::MXFP4, &[&[130u8][..], &same].concat());
    for i in 0..16 {
        assert_eq!(y[i], 4.0 * KV_MX[i]);
        assert_eq!(y[16 + i], 4.0 * KV_MX[i]);
    }
    // Floats.
    assert_eq!(deq(GgmlType::F32, &1.5f32.to_le_bytes()), vec![1.5]);
    assert_eq!(deq(GgmlType::F16, &f16b(-2.5)), vec![-2.5]);
    assert_eq!(deq(GgmlType::BF16, &[0x40, 0x3f]), vec![0.75]);
}

/// Q4_K / Q5_K scales: sc[j] = 8j + 3, mn[j] = 7j + 1, six bits each, packed as
/// bytes 0..4: sc[j] | (sc[j+4] >> 4) << 6; 4..8: mn[j] | (mn[j+4] >> 4) << 6;
/// 8..12: (sc[j+4] & 15) | (mn[j+4] & 15) << 4.
const K4_SCALES: [u8; 12] = [131, 139, 211, 219, 65, 136, 143, 214, 211, 75, 179, 43];

#[test]
fn hand_built_k_blocks() {
    let sc = |j: usize| (8 * j + 3) as f32;
    let mn = |j: usize| (7 * j + 1) as f32;
    // Q4_K: d = 1, dmin = 0.5, every byte 0x21: even groups level 1, odd groups level 2.
    let b = [&f16b(1.0)[..], &f16b(0.5), &K4_SCALES, &[0x21u8; 128]].concat();
    let y = deq(GgmlType::Q4_K, &b);
    for (e, v) in y.iter().enumerate() {
        let g = e / 32;
        let q = if g % 2 == 0 { 1.0 } else { 2.0 };
        assert_eq!(*v, sc(g) * q - 0.5 * mn(g), "Q4_K element {e}");
    }
    // Q5_K: qh = 0b10101010 adds 16 to odd groups.
    let b = [
        &f16b(1.0)[..],
        &f16b(0.5),
        &K4_SCALES,
        &[0xAAu8; 32],
        &[0x21u8; 128],
    ]
    .concat();
    let y = deq(GgmlType::Q5_K, &b);
    for (e, v) in y.iter().enumerate() {
        let g = e / 32;
        let q = if g % 2 == 0 { 1.0 } else { 18.0 };
        assert_eq!(*v, sc(g) * q - 0.5 * mn(g), "Q5_K element {e}");
    }
    // Q6_K: ql = 0x21, qh = 0b11_10_01_00 → levels 1, 17, 34, 50 for the four 32-runs
    // of each 128 half; minus 32; scales g - 8; d = 0.5.
    let scales: Vec<u8> = (0..16).map(|g| (g as i8 - 8) as u8).collect();
    let b = [&[0x21u8; 128][..], &[0xE4u8; 64], &scales, &f16b(0.5)].concat();
    let y = deq(GgmlType::Q6_K, &b);
    let lv = [1.0, 17.0, 34.0, 50.0];
    for (e, v) in y.iter().enumerate() {
        let g = e / 16;
        assert_eq!(
            *v,
            0.5 * (g as f32 - 8.0) * (lv[(e % 128) / 32] - 32.0),
            "Q6_K element {e}"
        );
    }
    // Q3_K: qs = 0b11_10_01_00 → low bits = shift index s; hmask 0x0F: high bit set in the
    // first half only (level = s there, s - 4 in the second); scale bytes 0x21 give low
    // nibbles 1 (g < 8) and 2 (g >= 8), byte 8 = 0xE4 gives top bits 0,1,2,3 to g = 0,4,8,12.
    let mut sb = [0x21u8; 12];
    sb[8] = 0xE4;
    sb[9] = 0;
    sb[10] = 0;
    sb[11] = 0;
    let b = [&[0x0Fu8; 32][..], &[0xE4u8; 64], &sb, &f16b(0.5)].concat();
    let y = deq(GgmlType::Q3_K, &b);
    for (e, v) in y.iter().enumerate() {
        let g = e / 16;
        let low = if g < 8 { 1 } else { 2 };
        let top = if g % 4 == 0 { g / 4 } else { 0 };
        let s = (low | (top << 4)) as f32 - 32.0;
        let shift = ((e % 128) / 32) as f32;
        let q = if e < 128 { shift } else { shift - 4.0 };
        assert_eq!(*v, 0.5 * s * q, "Q3_K element {e}");
    }
    // Q2_K: scales[g] = g | (15 - g) << 4; qs = 0xE4 → level = shift index; d = 0.5,
    // dmin = 0.25.
    let sc2: Vec<u8> = (0..16u8).map(|g| g | ((15 - g) << 4)).collect();
    let b = [&sc2[..], &[0xE4u8; 64], &f16b(0.5), &f16b(0.25)].concat();
    let y = deq(GgmlType::Q2_K, &b);
    for (e, v) in y.iter().enumerate() {
        let g = e / 16;
        let q = ((e % 128) / 32) as f32;
        assert_eq!(
            *v,
            (0.5 * g as f32) * q - 0.25 * (15 - g) as f32,
            "Q2_K element {e}"
        );
    }
    // IQ4_XS: scales_l nibbles 0..7, scales_h all 0b10 → scale = g; both nibbles j.
    let same: Vec<u8> = (0..16u8).map(|i| i | (i << 4)).collect();
    let qs: Vec<u8> = (0..8).flat_map(|_| same.clone()).collect();
    let b = [
        &f16b(1.0)[..],
        &0xAAAAu16.to_le_bytes(),
        &[0x10, 0x32, 0x54, 0x76],
        &qs,
    ]
    .concat();
    let y = deq(GgmlType::IQ4_XS, &b);
    for (e, v) in y.iter().enumerate() {
        assert_eq!(*v, (e / 32) as f32 * KV_NL[e % 16], "IQ4_XS element {e}");
    }
    // Q8_K: f32 d, i8 levels, bsums ignored.
    let mut b = 0.25f32.to_le_bytes().to_vec();
    b.extend((0..256i32).map(|i| (i - 128) as i8 as u8));
    b.extend([0u8; 32]);
    let y = deq(GgmlType::Q8_K, &b);
    assert_eq!(y[0], -32.0);
    assert_eq!(y[255], 0.25 * 127.0);
}

fn lcg_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

/// Offsets of f16 fields per block; their high byte is masked with 0x3B so that scales
/// stay finite.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        MXFP4 => &[],
        _ => &[0],
    }
}

/// Random blocks dequantized by gguf-py: (type, seed, blocks, FNV-1a of the f32 bits,
/// first four values).
#[allow(clippy::type_complexity)]
const ORACLE_RANDOM: &[(&str, u64, usize, u64, [f32; 4])] = &[
    (
        "Q4_0",
        29,
        4,
        0xeb3e6a4ef9c3714c,
        [0.830078125, 0.0, 0.498046875, -0.6640625],
    ),
    (
        "Q4_1",
        29,
        4,
        0x137eef5139ba7c93,
        [
            1.8282718658447266,
            0.6661624908447266,
            1.8282718658447266,
            1.8282718658447266,
        ],
    ),
    (
        "Q5_0",
        29,
        4,
        0x0cd9438effb39492,
        [1.826171875, -0.830078125, 0.33203125, 0.99609375],
    ),
    (
        "Q5_1",
        29,
        4,
        0xc2be2ab0e0937fad,
        [
            2.9903812408447266,
            3.6544437408447266,
            1.9942874908447266,
            3.4884281158447266,
        ],
    ),
    (
        "Q8_0",
        29,
        4,
        0x6507d55172b3ab95,
        [12.783203125, 14.609375, 12.451171875, -17.9296875],
    ),
    (
        "IQ4_NL",
        43,
        4,
        0x49552ec4669e3bb3,
        [
            1.3125381469726562,
            -1.53375244140625,
            -0.9585952758789062,
            -0.7226333618164062,
        ],
    ),
    (
        "Q2_K",
        29,
        4,
        0x0350493f26983029,
        [
            -0.015773773193359375,
            -0.015773773193359375,
            -0.015773773193359375,
            -0.015773773193359375,
        ],
    ),
    ("Q3_K", 29, 4, 0xe0a23b15ce4e903f, [-0.0, 0.0, 0.0, -0.0]),
    (
        "Q4_K",
        29,
        4,
        0x3ab597d55e058187,
        [
            18.223918914794922,
            10.919231414794922,
            16.397747039794922,
            5.440715789794922,
        ],
    ),
    (
        "Q5_K",
        29,
        4,
        0x91da189ca114ad99,
        [
            10.919231414794922,
            3.614543914794922,
            43.79032516479492,
            34.65946578979492,
        ],
    ),
    (
        "Q6_K",
        29,
        4,
        0x36a50b8c68f9d9d0,
        [
            -50.475341796875,
            33.12444305419922,
            45.74327850341797,
            -37.85650634765625,
        ],
    ),
    (
        "IQ4_XS",
        43,
        4,
        0x801725bfa6a5c41c,
        [
            -0.9733428955078125,
            2.3448715209960938,
            -2.1679000854492188,
            -0.9733428955078125,
        ],
    ),
    (
        "MXFP4",
        36,
        4,
        0xe65599b3f23e9254,
        [
            -5.192296858534828e+33,
            -1.0384593717069655e+34,
            7.788445287802241e+33,
            1.5576890575604483e+34,
        ],
    ),
    (
        "F16",
        22,
        512,
        0xe358f4d2d4f33ade,
        [
            0.83642578125,
            0.52197265625,
            0.03753662109375,
            0.0030117034912109375,
        ],
    ),
    (
        "BF16",
        29,
        512,
        0xeff765980e86ccb9,
        [
            7.748603820800781e-07,
            2.6495628995839168e-24,
            1.0248880880631385e-26,
            7.780442956573097e-13,
        ],
    ),
];

#[test]
fn dequantize_matches_gguf_py_on_random_blocks() {
    for &(name, seed, nb, hash, first) in ORACLE_RANDOM {
        let ty = GgmlType::from_name(name).unwrap();
        let ts = ty.type_size();
        let mut raw = lcg_bytes(seed, nb * ts);
        match ty {
            GgmlType::F16 => raw.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3B),
            GgmlType::BF16 => raw.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3F),
            _ => {
                for blk in raw.chunks_exact_mut(ts) {
                    for &o in f16_fields(ty) {
                        blk[o + 1] &= 0x3B;
                    }
                }
            }
        }
        let y = deq(ty, &raw);
        assert_eq!(&y[..4], &first, "{name}: first values");
        assert_eq!(fnv(&y), hash, "{name}: all values");
    }
}

/// ggml's reference quantizers on x_i = ((i * 7919) % 1000 - 500) / 137, 256 values:
/// (type, FNV-1a of the blocks, FNV-1a of their dequantized f32 bits), from gguf-py.
const ORACLE_QUANT: &[(&str, u64, u64)] = &[
    ("Q4_0", 0x67942b0b25335ffb, 0x2117c199c16b1001),
    ("Q4_1", 0x4446681071560429, 0xf5c916f2693b4b06),
    ("Q5_0", 0x0cccab73e82a0e70, 0x66ce08106219ba83),
    ("Q5_1", 0xd6ab1b17ed68a524, 0xae3c3b7bd65441be),
    ("Q8_0", 0x9461e0cea6b24e7a, 0x262be2ac69bb7807),
    ("MXFP4", 0x6c2b9bf4173af22b, 0x83fc2cd846e30722),
    ("BF16", 0xe771841151af91e4, 0xeb8977ba41d4871c),
    ("F16", 0x0ba25a6220fc799d, 0xac45f27c529fe28b),
];

#[test]
fn quantize_matches_ggml_reference_bytes() {
    let x: Vec<f32> = (0..256)
        .map(|i| (((i * 7919) % 1000) as f32 - 500.0) / 137.0)
        .collect();
    for &(name, hq, hd) in ORACLE_QUANT {
        let ty = GgmlType::from_name(name).unwrap();
        let q = quantize(ty, &x).unwrap();
        assert_eq!(q.len() as u64, ty.row_bytes(256).unwrap());
        assert_eq!(fnv_bytes(&q), hq, "{name}: quantized bytes");
        assert_eq!(fnv(&deq(ty, &q)), hd, "{name}: dequantized");
    }
}

/// Rows of real tensors dequantized by gguf-py: (file, tensor, type, data offset in the
/// file, ne0, row, first 8 values, FNV-1a of the row's f32 bits).
#[allow(clippy::type_complexity)]
const ORACLE_MODELS: &[(&str, &str, &str, u64, usize, usize, [f32; 8], u64)] = &[
    (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "token_embd.weight",
        "Q8_0",
        1785664,
        576,
        0,
        [
            -0.10654449462890625,
            0.032978057861328125,
            0.048198699951171875,
            -0.022830963134765625,
            -0.06849288940429688,
            -0.04566192626953125,
            0.020294189453125,
            -0.12176513671875,
        ],
        0x06ae84df65a472ad,
    ),
    (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "token_embd.weight",
        "Q8_0",
        1785664,
        576,
        5,
        [
            -0.00799560546875,
            -0.03997802734375,
            -0.031982421875,
            0.0159912109375,
            -0.1119384765625,
            0.0,
            -0.0479736328125,
            0.06396484375,
        ],
        0xcfcf7632c3bc5fad,
    ),
    (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "blk.0.ffn_down.weight",
        "Q4_1",
        31868992,
        1536,
        0,
        [
            -0.330810546875,
            0.3460693359375,
            0.0753173828125,
            -0.4661865234375,
            -0.06005859375,
            -0.330810546875,
            0.0753173828125,
            0.210693359375,
        ],
        0x00f58279133d70e4,
    ),
    (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "blk.0.ffn_down.weight",
        "Q4_1",
        31868992,
        1536,
        5,
        [
            -0.198577880859375,
            -0.127227783203125,
            -0.055877685546875,
            -0.055877685546875,
            0.015472412109375,
            0.12249755859375,
            0.015472412109375,
            -0.376953125,
        ],
        0x832b75f846416f6f,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "token_embd.weight",
        "Q8_0",
        6527680,
        640,
        0,
        [
            -0.007244110107421875,
            0.042860984802246094,
            -0.034409523010253906,
            -0.02112865447998047,
            -0.012073516845703125,
            0.0289764404296875,
            0.00482940673828125,
            -0.03199481964111328,
        ],
        0x0a2984b75c698dbf,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "token_embd.weight",
        "Q8_0",
        6527680,
        640,
        5,
        [
            -0.014050483703613281,
            0.005464076995849609,
            -0.06322717666625977,
            -0.0007805824279785156,
            -0.004683494567871094,
            0.008586406707763672,
            -0.004683494567871094,
            -0.014831066131591797,
        ],
        0xf18b54053108de3f,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "blk.0.attn_k.weight",
        "Q5_0",
        184785600,
        640,
        0,
        [
            0.0,
            -0.027557373046875,
            0.011810302734375,
            -0.027557373046875,
            0.031494140625,
            0.011810302734375,
            -0.02362060546875,
            -0.011810302734375,
        ],
        0x89530455a95aa179,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "blk.0.attn_k.weight",
        "Q5_0",
        184785600,
        640,
        5,
        [
            -0.0101318359375,
            0.002532958984375,
            -0.017730712890625,
            -0.00506591796875,
            -0.017730712890625,
            0.007598876953125,
            -0.00506591796875,
            -0.007598876953125,
        ],
        0x8618a8e7044da8de,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "blk.0.attn_output.weight",
        "Q4_K",
        184901824,
        1024,
        0,
        [
            -0.015705108642578125,
            0.04966926574707031,
            -0.03749656677246094,
            0.06056499481201172,
            -0.004809379577636719,
            0.038773536682128906,
            -0.015705108642578125,
            0.0278778076171875,
        ],
        0xf23bcf7705958562,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "blk.0.attn_output.weight",
        "Q4_K",
        184901824,
        1024,
        5,
        [
            0.008610725402832031,
            -0.019036531448364258,
            0.008610725402832031,
            -0.08815467357635498,
            -0.04668378829956055,
            -0.019036531448364258,
            -0.0328601598739624,
            0.03625798225402832,
        ],
        0x115db8bc8f48d9bf,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "blk.0.ffn_down.weight",
        "Q6_K",
        185896128,
        2048,
        0,
        [
            0.0052117109298706055,
            0.02171546220779419,
            -0.02518993616104126,
            0.013897895812988281,
            0.026927173137664795,
            -0.015635132789611816,
            0.010423421859741211,
            -0.0017372369766235352,
        ],
        0x6a6309c8ded00cf7,
    ),
    (
        "gemma-3-270m-q4_k_m.gguf",
        "blk.0.ffn_down.weight",
        "Q6_K",
        185896128,
        2048,
        5,
        [
            -0.011805176734924316,
            -0.010118722915649414,
            0.0,
            -0.004216134548187256,
            0.023610353469848633,
            -0.010961949825286865,
            -0.0025296807289123535,
            0.012648403644561768,
        ],
        0xed4213dcb6ad76f5,
    ),
];

fn models_dir() -> std::path::PathBuf {
    match std::env::var_os("CALDERA_MODELS") {
        Some(p) => p.into(),
        None => concat!(env!("CARGO_MANIFEST_DIR"), "/../../models").into(),
    }
}

#[test]
fn dequantize_real_model_rows() {
    use std::io::{Read, Seek, SeekFrom};
    for &(file, tensor, tname, offset, ne0, row, first, hash) in ORACLE_MODELS {
        let path = models_dir().join(file);
        let Ok(mut f) = std::fs::File::open(&path) else {
            eprintln!("skipping {tensor} of {file}: {} not found", path.display());
            continue;
        };
        let ty = GgmlType::from_name(tname).unwrap();
        let rb = ty.row_bytes(ne0 as u64).unwrap();
        let mut raw = vec![0u8; rb as usize];
        f.seek(SeekFrom::Start(offset + row as u64 * rb)).unwrap();
        f.read_exact(&mut raw).unwrap();
        let y = deq(ty, &raw);
        assert_eq!(&y[..8], &first, "{file} {tensor} row {row}");
        assert_eq!(fnv(&y), hash, "{file} {tensor} row {row}");

        // The dot product of the real row with a ramp agrees with the dequantized row.
        let x: Vec<f32> = (0..ne0).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let mut acts = QuantizedActs::default();
        acts.prepare(ty, &x, ne0).unwrap();
        let want: f32 = y.iter().zip(&x).map(|(a, b)| a * b).sum();
        let got = vec_dot(ty, &raw, &acts, 0);
        let mag: f32 = y.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (got - want).abs() <= 0.01 * mag,
            "{tensor}: dot {got} vs {want}"
        );
    }
}

#[test]
fn wrong_lengths_and_types_are_errors() {
    let mut out = vec![0.0f32; 32];
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 19], &mut out).is_err());
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]).is_err());
    assert!(dequantize(GgmlType::Q4_K, &[0u8; 144], &mut out).is_err());
    assert!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0.0; 256]).is_err());
    assert!(dequantize(GgmlType::I32, &[0u8; 4], &mut [0.0]).is_err());
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out).is_ok());
    assert!(quantize(GgmlType::Q4_0, &[0.0; 33]).is_err());
    assert!(quantize(GgmlType::Q6_K, &[0.0; 128]).is_err());
    assert!(quantize(GgmlType::Q8_K, &[0.0; 256]).is_err());
    assert!(quantize(GgmlType::IQ3_S, &[0.0; 256]).is_err());
    assert!(quantize(GgmlType::F32, &[]).unwrap().is_empty());
    let mut acts = QuantizedActs::default();
    assert!(acts.prepare(GgmlType::Q4_K, &[0.0; 128], 128).is_err());
    assert!(acts.prepare(GgmlType::Q4_0, &[0.0; 64], 0).is_err());
    assert!(acts.prepare(GgmlType::Q4_0, &[0.0; 96], 64).is_err());
    assert!(acts.prepare(GgmlType::IQ2_XS, &[0.0; 256], 256).is_err());
    assert!(acts.prepare(GgmlType::Q4_0, &[0.0; 96], 32).is_ok());
    assert_eq!((acts.rows(), acts.k()), (3, 32));
    for ty in GgmlType::ALL {
        if supports_quantize(ty) {
            assert!(supports_dequantize(ty), "{ty}");
        }
    }
}
