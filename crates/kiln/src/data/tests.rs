//! Unit tests of the data layer's parsers on bytes in memory, and property tests that no input
//! (random bytes, mutated valid files, any tensor shapes, fractions and rows) makes it panic.

use super::files::{parse_idx, ReadOptions};
use super::npy;
use super::Dataset;
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use std::io::Write;

/// An NPY file (format `version`) with the dict numpy writes, padded to a multiple of 64.
fn npy_file(version: u8, descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    let pre = if version == 1 { 10 } else { 12 };
    let unpadded = pre + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let len = total - pre;
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    if version == 1 {
        out.extend((len as u16).to_le_bytes());
    } else {
        out.extend((len as u32).to_le_bytes());
    }
    out.extend(dict.bytes());
    out.extend(std::iter::repeat_n(b' ', total - unpadded));
    out.push(b'\n');
    out.extend(data);
    out
}

fn strict() -> ReadOptions {
    ReadOptions::default()
}

fn parse(bytes: &[u8]) -> Result<npy::Array, String> {
    let a = npy::parse(bytes, &strict());
    // The streaming reader agrees with the in-memory one.
    let b = npy::read(bytes, bytes.len() as u64, &strict());
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!((&x.shape, &x.values), (&y.shape, &y.values)),
        (Err(_), Err(_)) => {}
        _ => panic!("npy::parse and npy::read disagree: {a:?} vs {b:?}"),
    }
    a
}

#[test]
fn every_dtype_round_trips_exactly() {
    let le =
        |vals: &[f64], f: fn(f64) -> Vec<u8>| vals.iter().flat_map(|&v| f(v)).collect::<Vec<u8>>();
    type Case = (&'static str, Vec<u8>, Vec<f32>);
    let cases: Vec<Case> = vec![
        (
            "<f4",
            le(&[1.5, -0.0, 3.0e38], |v| (v as f32).to_le_bytes().to_vec()),
            vec![1.5, -0.0, 3.0e38],
        ),
        (
            ">f4",
            le(&[1.5, -2.25], |v| (v as f32).to_be_bytes().to_vec()),
            vec![1.5, -2.25],
        ),
        (
            "<f8",
            le(&[0.1, -1e-300], |v| v.to_le_bytes().to_vec()),
            vec![0.1f64 as f32, -1e-300f64 as f32],
        ),
        (">f8", le(&[2.5], |v| v.to_be_bytes().to_vec()), vec![2.5]),
        // f16: 1, -2, 65504 (max), 2^-24 (smallest subnormal), 2^-14 (smallest normal).
        (
            "<f2",
            vec![0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00, 0x00, 0x04],
            vec![1., -2., 65504., 2f32.powi(-24), 2f32.powi(-14)],
        ),
        (">f2", vec![0x3c, 0x00, 0x35, 0x55], vec![1., 0.333_251_95]),
        ("|i1", vec![0x80, 0xff, 0x7f], vec![-128., -1., 127.]),
        ("<i1", vec![0x80], vec![-128.]),
        ("|u1", vec![0, 7, 255], vec![0., 7., 255.]),
        (
            "<i2",
            le(&[-32768., 300.], |v| (v as i16).to_le_bytes().to_vec()),
            vec![-32768., 300.],
        ),
        (
            ">i2",
            le(&[-2., 258.], |v| (v as i16).to_be_bytes().to_vec()),
            vec![-2., 258.],
        ),
        (
            "<u2",
            le(&[65535., 1.], |v| (v as u16).to_le_bytes().to_vec()),
            vec![65535., 1.],
        ),
        (
            "<i4",
            le(&[-16777216., 5.], |v| (v as i32).to_le_bytes().to_vec()),
            vec![-16777216., 5.],
        ),
        (
            ">u4",
            le(&[16777216., 9.], |v| (v as u32).to_be_bytes().to_vec()),
            vec![16777216., 9.],
        ),
        (
            "<u4",
            le(&[4294967295.], |v| (v as u32).to_le_bytes().to_vec()),
            vec![4294967295.],
        ),
        (
            "<i8",
            le(&[-3., 1099511627776.], |v| {
                (v as i64).to_le_bytes().to_vec()
            }),
            vec![-3., 1099511627776.],
        ),
        (
            "<u8",
            le(&[42.], |v| (v as u64).to_le_bytes().to_vec()),
            vec![42.],
        ),
        ("|b1", vec![0, 1, 1, 0], vec![0., 1., 1., 0.]),
    ];
    for (descr, data, want) in cases {
        for version in [1, 2, 3] {
            let shape = format!("({},)", want.len());
            let a = parse(&npy_file(version, descr, false, &shape, &data))
                .unwrap_or_else(|e| panic!("{descr}: {e}"));
            assert_eq!(a.shape, vec![want.len()], "{descr}");
            assert_eq!(
                a.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{descr} version {version}: {:?} vs {want:?}",
                a.values
            );
        }
    }
}

#[test]
fn f16_special_values() {
    assert_eq!(npy::f16_to_f32(0x7c00), f32::INFINITY);
    assert_eq!(npy::f16_to_f32(0xfc00), f32::NEG_INFINITY);
    assert!(npy::f16_to_f32(0x7e00).is_nan());
    assert_eq!(npy::f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    assert_eq!(npy::f16_to_f32(0x3555), 0.333_251_95);
    assert_eq!(npy::f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
}

#[test]
fn fortran_order_gives_the_transposed_layout() {
    // A 2×3 array [[1, 2, 3], [4, 5, 6]] stored column by column.
    let data: Vec<u8> = [1f32, 4., 2., 5., 3., 6.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let a = parse(&npy_file(1, "<f4", true, "(2, 3)", &data)).unwrap();
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.values, vec![1., 2., 3., 4., 5., 6.]);
    // 2×3×2: element [i, j, k] stored at i + 2j + 6k holds 100i + 10j + k.
    let mut stored = [0f32; 12];
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..2 {
                stored[i + 2 * j + 6 * k] = (100 * i + 10 * j + k) as f32;
            }
        }
    }
    let data: Vec<u8> = stored.iter().flat_map(|v| v.to_le_bytes()).collect();
    let a = parse(&npy_file(1, "<f4", true, "(2, 3, 2)", &data)).unwrap();
    let want: Vec<f32> = (0..2)
        .flat_map(|i| (0..3).flat_map(move |j| (0..2).map(move |k| (100 * i + 10 * j + k) as f32)))
        .collect();
    assert_eq!(a.values, want);
    // A NaN in Fortran order is reported at its real index: stored position 3 is [1, 1] of 2×3.
    let mut v = [0f32; 6];
    v[3] = f32::NAN;
    let data: Vec<u8> = v.iter().flat_map(|v| v.to_le_bytes()).collect();
    let e = parse(&npy_file(1, "<f4", true, "(2, 3)", &data)).unwrap_err();
    assert!(e.starts_with("the value at [1, 1] (row 1) is NaN"), "{e}");
}

#[test]
fn a_header_claiming_2_pow_40_rows_is_refused_before_allocating() {
    let f = npy_file(1, "<f4", false, "(1099511627776, 3)", &[0; 12]);
    let e = parse(&f).unwrap_err();
    assert!(e.contains("over the limit"), "{e}");
    let lenient = ReadOptions::default().max_bytes(u64::MAX);
    let e = npy::parse(&f, &lenient).unwrap_err();
    assert!(
        e.contains("13194139533312 bytes of data, but 12 bytes follow"),
        "{e}"
    );
    let e = npy::read(&f[..], f.len() as u64, &lenient).unwrap_err();
    assert!(
        matches!(e, npy::ReadError::Format(ref m) if m.contains("but 12 bytes follow")),
        "{e:?}"
    );
    // Element counts that overflow u64.
    let e = parse(&npy_file(1, "<f8", false, "(18446744073709551615, 2)", &[])).unwrap_err();
    assert!(e.contains("more elements than can be counted"), "{e}");
    let e = parse(&npy_file(1, "<f8", false, "(4611686018427387904,)", &[])).unwrap_err();
    assert!(e.contains("more bytes than can be counted"), "{e}");
    let e = parse(&npy_file(
        1,
        "<f8",
        false,
        "(99999999999999999999999,)",
        &[],
    ))
    .unwrap_err();
    assert!(e.contains("malformed NPY header"), "{e}");
}

#[test]
fn sizes_must_match_exactly() {
    let data: Vec<u8> = [1f32, 2.].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(parse(&npy_file(1, "<f4", false, "(2,)", &data)).is_ok());
    let e = parse(&npy_file(1, "<f4", false, "(3,)", &data)).unwrap_err();
    assert!(e.contains("12 bytes of data, but 8 bytes follow"), "{e}");
    let e = parse(&npy_file(1, "<f4", false, "(1,)", &data)).unwrap_err();
    assert!(e.contains("4 bytes of data, but 8 bytes follow"), "{e}");
    // Zero-size arrays have no data.
    let a = parse(&npy_file(1, "<f4", false, "(0, 5)", &[])).unwrap();
    assert_eq!((a.shape, a.values.len()), (vec![0, 5], 0));
    // A 0-d array holds one element; the loaders refuse it, the parser returns it.
    let a = parse(&npy_file(1, "<f4", false, "()", &data[..4])).unwrap();
    assert_eq!((a.shape, a.values), (vec![], vec![1.]));
}

#[test]
fn malformed_headers_are_errors() {
    let ok = npy_file(1, "<f4", false, "(1,)", &[0; 4]);
    assert!(parse(&ok).is_ok());
    let dicts = [
        "",
        "{",
        "}",
        "{}",
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}",
        "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': [1]}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} trailing",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (1,)}",
        "{'descr': <f4, 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f4\\'', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<U4', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '|f4', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f3', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<c8', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '|O', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<b2', 'fortran_order': False, 'shape': (1,)}",
        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", // no closing brace
    ];
    for d in dicts {
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend((d.len() as u16).to_le_bytes());
        f.extend(d.bytes());
        f.extend([0; 4]);
        assert!(parse(&f).is_err(), "accepted {d:?}");
    }
    // Bad magic, version and lengths.
    for f in [
        b"".to_vec(),
        b"\x93NUMP".to_vec(),
        b"\x93NUMPX\x01\x00".to_vec(),
        b"\x93NUMPY\x04\x00\x00\x00".to_vec(),
        b"\x93NUMPY\x01\x00\xff\xff{}".to_vec(),
        b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec(),
        b"\x93NUMPY\x02\x00".to_vec(),
    ] {
        assert!(parse(&f).is_err(), "accepted {f:?}");
    }
    let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}";
    let mut f = b"\x93NUMPY\x01\x00".to_vec();
    f.extend((structured.len() as u16).to_le_bytes());
    f.extend(structured.bytes());
    assert!(parse(&f).unwrap_err().contains("structured dtype"));
    let e = parse(&npy_file(1, "<U4", false, "(1,)", &[0; 16])).unwrap_err();
    assert!(e.contains("numpy dtype `<U4` is not one kiln reads"), "{e}");
}

#[test]
fn non_finite_values_are_refused_unless_allowed() {
    let data: Vec<u8> = [1f32, 2., f32::NAN, 4.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f = npy_file(1, "<f4", false, "(2, 2)", &data);
    let e = parse(&f).unwrap_err();
    assert!(
        e.starts_with("the value at [1, 0] (row 1) is NaN: fix the data"),
        "{e}"
    );
    assert!(e.contains("allow_non_finite = true"), "{e}");
    let a = npy::parse(&f, &ReadOptions::default().allow_non_finite(true)).unwrap();
    assert!(a.values[2].is_nan());
    let data: Vec<u8> = [1f64, 1e300].iter().flat_map(|v| v.to_le_bytes()).collect();
    let e = parse(&npy_file(1, "<f8", false, "(2,)", &data)).unwrap_err();
    assert!(
        e.starts_with("the value at [1] (row 1) is 1e300, beyond what f32 holds"),
        "{e}"
    );
    let data: Vec<u8> = [f32::NEG_INFINITY]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let e = parse(&npy_file(1, "<f4", false, "(1, 1)", &data)).unwrap_err();
    assert!(e.starts_with("the value at [0, 0] (row 0) is -inf"), "{e}");
    // Integers are always finite.
    assert!(parse(&npy_file(1, "<i4", false, "(1,)", &[0xff; 4])).is_ok());
}

fn idx_file(kind: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn idx(bytes: &[u8], options: &ReadOptions) -> Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        parse_idx(flate2::read::GzDecoder::new(bytes), true, options)
    } else {
        parse_idx(bytes, false, options)
    }
}

#[test]
fn idx_values_and_refusals() {
    let cases: Vec<(u8, Vec<u8>, Vec<f32>)> = vec![
        (0x08, vec![0, 255], vec![0., 255.]),
        (0x09, vec![0x80, 0x7f], vec![-128., 127.]),
        (
            0x0B,
            [-300i16, 2].iter().flat_map(|v| v.to_be_bytes()).collect(),
            vec![-300., 2.],
        ),
        (
            0x0C,
            [-70000i32, 1]
                .iter()
                .flat_map(|v| v.to_be_bytes())
                .collect(),
            vec![-70000., 1.],
        ),
        (
            0x0D,
            [1.5f32, -2.].iter().flat_map(|v| v.to_be_bytes()).collect(),
            vec![1.5, -2.],
        ),
        (
            0x0E,
            [0.25f64, 8.].iter().flat_map(|v| v.to_be_bytes()).collect(),
            vec![0.25, 8.],
        ),
    ];
    for (kind, data, want) in cases {
        let f = idx_file(kind, &[2, 1], &data);
        assert_eq!(
            idx(&f, &strict()),
            Ok((vec![2, 1], want.clone())),
            "kind {kind}"
        );
        assert_eq!(
            idx(&gzip(&f), &strict()),
            Ok((vec![2, 1], want)),
            "gzip kind {kind}"
        );
    }
    let e = idx(&idx_file(0x08, &[], &[1]), &strict()).unwrap_err();
    assert!(e.contains("0 dimensions (a 0-d array"), "{e}");
    // Dims whose product overflows, or claims far past the limit, before anything is read.
    let e = idx(&idx_file(0x0E, &[u32::MAX; 5], &[]), &strict()).unwrap_err();
    assert!(e.contains("claim more than"), "{e}");
    let e = idx(
        &gzip(&idx_file(0x08, &[u32::MAX, u32::MAX], &[1, 2])),
        &strict(),
    )
    .unwrap_err();
    assert!(e.contains("claim more than"), "{e}");
    let e = idx(&idx_file(0x08, &[3], &[1, 2]), &strict()).unwrap_err();
    assert!(
        e.contains("truncated: dims [3] need 3 bytes of data, the file has 2"),
        "{e}"
    );
    let e = idx(&idx_file(0x08, &[1], &[1, 2]), &strict()).unwrap_err();
    assert!(e.contains("more data than its dims [1] need"), "{e}");
    // A gzip stream far longer than its header says is not decompressed to the end.
    let bomb = gzip(&idx_file(0x08, &[4], &vec![0; 10 << 20]));
    let e = idx(&bomb, &strict()).unwrap_err();
    assert!(e.contains("more data than its dims [4] need"), "{e}");
    // A damaged gzip checksum is found.
    let mut g = gzip(&idx_file(0x08, &[4], &[1, 2, 3, 4]));
    let n = g.len();
    g[n - 8] ^= 1; // the CRC32 in the trailer
    let e = idx(&g, &strict()).unwrap_err();
    assert!(e.contains("broken gzip stream"), "{e}");
    // Non-finite floats name index and row.
    let data: Vec<u8> = [1f32, 2., 3., f32::INFINITY]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let e = idx(&idx_file(0x0D, &[2, 2], &data), &strict()).unwrap_err();
    assert!(
        e.starts_with("the value at [1, 1] (row 1) is inf: fix the data"),
        "{e}"
    );
    assert!(idx(
        &idx_file(0x0D, &[2, 2], &data),
        &ReadOptions::default().allow_non_finite(true)
    )
    .is_ok());
    for bad in [
        vec![],
        vec![0, 0, 8],
        vec![1, 0, 8, 1],
        vec![0, 0, 0x0A, 1, 0, 0, 0, 1, 0],
        vec![0, 0, 8, 2, 0, 0, 0, 1],
    ] {
        assert!(idx(&bad, &strict()).is_err(), "accepted {bad:?}");
    }
}

fn valid_npy() -> Vec<u8> {
    let data: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
    npy_file(1, "<f4", false, "(2, 3)", &data)
}

fn valid_idx() -> Vec<u8> {
    idx_file(
        0x0D,
        &[2, 2],
        &[
            0x3f, 0x80, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x40, 0x40, 0, 0,
        ],
    )
}

/// A mutation of a valid file: flip, insert, delete bytes or truncate.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let n = bytes.len();
        match *m {
            Mutation::Flip(i, b) if n > 0 => bytes[i % n] ^= b,
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Mutation::Delete(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            _ => {}
        }
    }
}

fn dataset_tensor(dims: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    t.to_dtype(dtype).unwrap()
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::U8),
        Just(DType::U32),
        Just(DType::I64),
        Just(DType::F64)
    ]
}

fn dims() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..4, 0..4)
}

fn fraction() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(-0.0),
        Just(0.0),
        Just(1.0),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MIN_POSITIVE),
        Just(1e-300),
        Just(1.0 - f64::EPSILON),
        -2.0..2.0f64,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn npy_random_arrays_round_trip(
        shape in prop::collection::vec(0usize..4, 1..4),
        fortran in any::<bool>(),
        big_endian in any::<bool>(),
        version in 1u8..4,
        seed in any::<u32>(),
    ) {
        let count: usize = shape.iter().product();
        // Row-major values, each unique: v[flat] = flat + seed fraction.
        let want: Vec<f32> = (0..count).map(|i| i as f32 + (seed % 1000) as f32 / 1000.0).collect();
        // Stored order: Fortran stores the first axis fastest.
        let stored: Vec<f32> = if fortran {
            let mut out = vec![0f32; count];
            for (c_flat, &v) in want.iter().enumerate() {
                let (mut rest, mut f_flat, mut stride) = (c_flat, 0, 1);
                let mut index = vec![0; shape.len()];
                for a in (0..shape.len()).rev() {
                    index[a] = rest % shape[a];
                    rest /= shape[a];
                }
                for a in 0..shape.len() {
                    f_flat += index[a] * stride;
                    stride *= shape[a];
                }
                out[f_flat] = v;
            }
            out
        } else {
            want.clone()
        };
        let data: Vec<u8> = stored
            .iter()
            .flat_map(|v| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() })
            .collect();
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let tuple = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
        let descr = if big_endian { ">f4" } else { "<f4" };
        let a = parse(&npy_file(version, descr, fortran, &tuple, &data)).unwrap();
        prop_assert_eq!(a.shape, shape);
        prop_assert_eq!(a.values, want);
    }

    #[test]
    fn npy_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&bytes);
        let mut with_magic = b"\x93NUMPY\x01\x00".to_vec();
        with_magic.extend(&bytes);
        let _ = parse(&with_magic);
    }

    #[test]
    fn npy_mutated_files_never_panic(ms in prop::collection::vec(mutation(), 1..4), fortran in any::<bool>()) {
        let mut f = if fortran {
            npy_file(2, ">f8", true, "(2, 1, 2)", &[0x3f; 32])
        } else {
            valid_npy()
        };
        mutate(&mut f, &ms);
        if let Ok(a) = parse(&f) {
            let count: usize = a.shape.iter().product();
            prop_assert_eq!(count, a.values.len());
        }
    }

    #[test]
    fn idx_random_and_mutated_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        ms in prop::collection::vec(mutation(), 1..4),
        zipped in any::<bool>(),
    ) {
        let _ = idx(&bytes, &strict());
        let mut head = vec![0, 0];
        head.extend(&bytes);
        let _ = idx(&head, &strict());
        let mut f = valid_idx();
        if zipped {
            f = gzip(&f);
        }
        mutate(&mut f, &ms);
        if let Ok((dims, values)) = idx(&f, &strict()) {
            prop_assert_eq!(dims.iter().product::<usize>(), values.len());
        }
    }

    #[test]
    fn dataset_constructors_never_panic(
        shapes in prop::collection::vec((dims(), dtype()), 0..4),
        weight in prop::option::of(dims()),
        picks in prop::collection::vec(0u32..5, 0..6),
        (start, len) in (0usize..5, 0usize..5),
        f in fraction(),
        seed in any::<u64>(),
    ) {
        let tensors: Vec<Tensor> = shapes.iter().map(|(d, t)| dataset_tensor(d, *t)).collect();
        let (inputs, targets) = tensors.split_at(tensors.len() / 2);
        let all_ranked = tensors.iter().all(|t| t.rank() > 0);
        let same_rows = tensors.windows(2).all(|w| w[0].rank() > 0 && w[1].rank() > 0 && w[0].dims()[0] == w[1].dims()[0]);
        let multi = Dataset::multi(inputs.to_vec(), targets.to_vec());
        prop_assert_eq!(multi.is_ok(), !inputs.is_empty() && all_ranked && same_rows);
        if let Some(first) = tensors.first() {
            let _ = Dataset::new(first.clone(), tensors.last().unwrap().clone());
        }
        if let Ok(data) = &multi {
            // Every operation on any ranks, dtypes and zero-size axes: a value or an error.
            let n = data.len();
            let picked = data.select(&picks);
            prop_assert_eq!(picked.is_ok(), picks.iter().all(|&p| (p as usize) < n));
            if let Ok(p) = picked {
                prop_assert_eq!(p.len(), picks.len());
                for (a, b) in p.inputs().iter().zip(data.inputs()) {
                    prop_assert_eq!(&a.dims()[1..], &b.dims()[1..]);
                }
            }
            prop_assert_eq!(data.slice(start, len).is_ok(), start + len <= n);
            if let Ok((a, b)) = data.split_tail(f) {
                prop_assert_eq!(a.len() + b.len(), n);
            }
            if let Ok((a, b)) = data.shuffled_split(f, seed) {
                prop_assert_eq!(a.len() + b.len(), n);
            }
        }
        if let (Ok(data), Some(w)) = (multi, weight) {
            let n = data.len();
            let w_ok = !w.is_empty() && w[0] == n;
            prop_assert_eq!(data.with_sample_weight(dataset_tensor(&w, DType::F32)).is_ok(), w_ok);
        }
    }

    #[test]
    fn dataset_views_never_panic(
        rows in 0usize..6,
        cols in 1usize..4,
        view in 0u8..3,
        picks in prop::collection::vec(0u32..10, 0..8),
        start in 0usize..8,
        len in prop_oneof![0usize..8, Just(usize::MAX)],
        f in fraction(),
        seed in any::<u64>(),
    ) {
        // A contiguous table, a column slice of a wider one, or a transposed view.
        let base = Tensor::arange(0f32, (rows * (cols + 2)) as f32, &Device::Cpu).unwrap();
        let x = match view {
            0 => base.narrow(0, 0, rows * cols).unwrap().reshape((rows, cols)).unwrap(),
            1 => base.reshape((rows, cols + 2)).unwrap().narrow(1, 1, cols).unwrap(),
            _ => base.narrow(0, 0, rows * cols).unwrap().reshape((cols, rows)).unwrap().t().unwrap(),
        };
        let y = Tensor::arange(0u32, rows as u32, &Device::Cpu).unwrap();
        let data = Dataset::new(x.clone(), y).unwrap();
        let picked = data.select(&picks);
        let in_range = picks.iter().all(|&p| (p as usize) < rows);
        prop_assert_eq!(picked.is_ok(), in_range);
        if let Ok(p) = picked {
            let want: Vec<Vec<f32>> = picks.iter().map(|&r| x.get(r as usize).unwrap().to_vec1().unwrap()).collect();
            prop_assert_eq!(p.inputs()[0].to_vec2::<f32>().unwrap(), want);
            prop_assert_eq!(p.targets()[0].to_vec1::<u32>().unwrap(), picks.clone());
        }
        let sliced = data.slice(start, len);
        prop_assert_eq!(sliced.is_ok(), start.checked_add(len).is_some_and(|e| e <= rows));
        let valid_fraction = (0.0..1.0).contains(&f);
        for split in [data.split_tail(f), data.shuffled_split(f, seed)] {
            match split {
                Ok((a, b)) => {
                    prop_assert!(valid_fraction);
                    prop_assert_eq!(a.len() + b.len(), rows);
                    prop_assert!(f <= 0.0 || (!a.is_empty() && !b.is_empty()));
                }
                Err(_) => prop_assert!(!valid_fraction || f > 0.0),
            }
        }
    }
}

#[test]
fn zero_d_tensors_are_errors_not_panics() {
    let s = Tensor::new(1f32, &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let e = Dataset::new(s.clone(), x.clone()).unwrap_err().to_string();
    assert!(
        e.contains("input 0 is 0-d (a scalar): a data set needs one row per sample"),
        "{e}"
    );
    let e = Dataset::new(x.clone(), s.clone()).unwrap_err().to_string();
    assert!(e.contains("target 0 is 0-d"), "{e}");
    let data = Dataset::new(x.clone(), x.clone()).unwrap();
    let e = data.with_sample_weight(s).unwrap_err().to_string();
    assert!(e.contains("sample_weight is 0-d"), "{e}");
    let e = Dataset::multi(vec![], vec![x]).unwrap_err().to_string();
    assert!(e.contains("at least one input"), "{e}");
}

#[test]
fn split_fractions_at_the_edges() {
    let x = Tensor::zeros((10, 1), DType::F32, &Device::Cpu).unwrap();
    let data = Dataset::inputs_only(vec![x]).unwrap();
    for bad in [
        f64::NAN,
        -0.1,
        -1e-300,
        1.0,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert!(data.split_tail(bad).is_err(), "{bad}");
        assert!(data.shuffled_split(bad, 1).is_err(), "{bad}");
    }
    // -0.0 is zero: everything in the first part.
    let (a, b) = data.split_tail(-0.0).unwrap();
    assert_eq!((a.len(), b.len()), (10, 0));
    // A positive fraction too small for one sample leaves the held-out part empty: an error.
    let e = data.split_tail(1e-300).unwrap_err().to_string();
    assert!(e.contains("leaves an empty part"), "{e}");
    let (a, b) = data.split_tail(0.1).unwrap();
    assert_eq!((a.len(), b.len()), (9, 1));
    let (a, b) = data.split_tail(0.99).unwrap();
    assert_eq!((a.len(), b.len()), (1, 9));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Sample weights per output, on any number of targets and entries of any rows: accepted
    /// exactly when there is one entry per target and every given weight has a row per sample,
    /// and then each output reads its own weight through select, slice and split alike.
    #[test]
    fn output_sample_weights_are_checked_and_follow_the_rows(
        n in 1usize..6,
        targets in 0usize..4,
        entries in proptest::collection::vec(proptest::option::of(0usize..7), 0..5),
        shared_first in any::<bool>(),
    ) {
        let x = dataset_tensor(&[n, 2], DType::F32);
        let ys: Vec<Tensor> = (0..targets).map(|_| dataset_tensor(&[n], DType::F32)).collect();
        let data = Dataset::multi(vec![x], ys).unwrap();
        let weights: Vec<Option<Tensor>> = entries
            .iter()
            .map(|e| e.map(|rows| Tensor::arange(0f32, rows as f32, &Device::Cpu).unwrap()))
            .collect();
        let data = match shared_first {
            true => data.with_sample_weight(dataset_tensor(&[n], DType::F32)).unwrap(),
            false => data,
        };
        let fits = !shared_first
            && entries.len() == targets
            && entries.iter().flatten().all(|&rows| rows == n);
        let got = data.with_output_sample_weights(weights);
        prop_assert_eq!(got.is_ok(), fits);
        if let Ok(d) = got {
            let picked = d.select(&[(n - 1) as u32]).unwrap();
            let tail = d.slice(n - 1, 1).unwrap();
            for (i, e) in entries.iter().enumerate() {
                prop_assert_eq!(d.sample_weight_for(i).is_some(), e.is_some());
                if e.is_some() {
                    let last = (n - 1) as f32;
                    prop_assert_eq!(picked.sample_weight_for(i).unwrap().to_vec1::<f32>().unwrap(), vec![last]);
                    prop_assert_eq!(tail.sample_weight_for(i).unwrap().to_vec1::<f32>().unwrap(), vec![last]);
                }
            }
        }
    }
}
