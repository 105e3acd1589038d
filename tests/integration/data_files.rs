//! The data layer on real files: exact values, exact error texts (file, array, line, column),
//! missing files, damaged archives, and a table of hostile inputs none of which may panic.

use super::mutations::{mutation, Mutation};
use candle_core::{DType, Device, Tensor};
use kiln::data::{self, ReadOptions};
use kiln::{Dataset, Error};
use proptest::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-data-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// An NPY file, format version 1, as numpy writes it (dict padded to a multiple of 64 bytes).
fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend(((total - 10) as u16).to_le_bytes());
    out.extend(dict.bytes());
    out.extend(std::iter::repeat_n(b' ', total - 10 - dict.len() - 1));
    out.push(b'\n');
    out.extend(data);
    out
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn npz(entries: &[(&str, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in entries {
        w.start_file(*name, options).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn text(r: kiln::Result<impl std::fmt::Debug>) -> String {
    r.unwrap_err().to_string()
}

const CPU: Device = Device::Cpu;

#[test]
fn npy_files_read_to_exact_values() {
    let d = dir("npy");
    let p = write(
        &d.join("x.npy"),
        &npy("<f4", false, "(2, 2)", &f32s(&[1., 2.5, -3., 4e-3])),
    );
    let t = data::load_npy(&p, &CPU).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1., 2.5], vec![-3., 4e-3]]
    );
    // Fortran order: stored column by column, read back row-major.
    let p = write(
        &d.join("f.npy"),
        &npy("<f4", true, "(2, 3)", &f32s(&[1., 4., 2., 5., 3., 6.])),
    );
    let t = data::load_npy(&p, &CPU).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1., 2., 3.], vec![4., 5., 6.]]
    );
    // Big-endian 64-bit integers.
    let ints: Vec<u8> = [-7i64, 1 << 40]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let p = write(&d.join("i.npy"), &npy(">i8", false, "(2,)", &ints));
    assert_eq!(
        data::load_npy(&p, &CPU).unwrap().to_vec1::<f32>().unwrap(),
        vec![-7., (1u64 << 40) as f32]
    );
    // Bool.
    let p = write(&d.join("b.npy"), &npy("|b1", false, "(3, 1)", &[1, 0, 1]));
    assert_eq!(
        data::load_npy(&p, &CPU)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1., 0., 1.]
    );
}

#[test]
fn npy_refusals_name_the_file() {
    let d = dir("npy-bad");
    let p = write(&d.join("x.npy"), &npy("<f4", false, "()", &f32s(&[1.])));
    assert_eq!(
        text(data::load_npy(&p, &CPU)),
        format!(
            "data: {}: holds a 0-d array (a scalar); a data set needs one row per sample: save it \
             with at least one axis (e.g. numpy's np.atleast_1d)",
            p.display()
        )
    );
    let p = write(
        &d.join("huge.npy"),
        &npy("<f4", false, "(1099511627776, 3)", &f32s(&[0.; 3])),
    );
    let e = text(data::load_npy(&p, &CPU));
    assert!(
        e.starts_with(&format!(
            "data: {}: the NPY header claims shape [1099511627776, 3]",
            p.display()
        )),
        "{e}"
    );
    let lenient = ReadOptions::default().max_bytes(u64::MAX);
    let e = text(data::load_npy_with(&p, &lenient, &CPU));
    assert!(
        e.contains("13194139533312 bytes of data, but 12 bytes follow the header"),
        "{e}"
    );
    let p = write(
        &d.join("nan.npy"),
        &npy("<f4", false, "(2, 2)", &f32s(&[0., 1., 2., f32::NAN])),
    );
    let e = text(data::load_npy(&p, &CPU));
    assert!(
        e.starts_with(&format!(
            "data: {}: the value at [1, 1] (row 1) is NaN: fix the data",
            p.display()
        )),
        "{e}"
    );
    let t = data::load_npy_with(&p, &ReadOptions::default().allow_non_finite(true), &CPU).unwrap();
    assert!(t.to_vec2::<f32>().unwrap()[1][1].is_nan());
    let p = write(&d.join("text.npy"), b"x,y\n1,2\n");
    assert!(text(data::load_npy(&p, &CPU)).contains("text.npy: not an NPY file"));
}

#[test]
fn missing_files_are_io_errors_naming_the_path() {
    let missing = dir("missing").join("nowhere.bin");
    let io = |e: Error| match e {
        Error::Io { path, .. } => assert_eq!(path, missing),
        other => panic!("not an Io error: {other}"),
    };
    io(data::load_npy(&missing, &CPU).unwrap_err());
    io(data::load_npz(&missing, &["x"], &CPU).unwrap_err());
    io(data::load_idx(&missing, &CPU).unwrap_err());
    io(data::load_csv(&missing, &["y".into()], &CPU).unwrap_err());
    io(data::load_csv_features(&missing, &CPU).unwrap_err());
    // A directory is not a file either.
    let d = dir("a-directory");
    assert!(data::load_npy(&d, &CPU).is_err());
    assert!(data::load_csv_features(&d, &CPU).is_err());
}

#[test]
fn npz_archives_stored_and_deflated() {
    let d = dir("npz");
    let x = npy("<f4", false, "(2, 2)", &f32s(&[1., 2., 3., 4.]));
    let y = npy("|u1", false, "(2,)", &[7, 9]);
    for method in [
        zip::CompressionMethod::Stored,
        zip::CompressionMethod::Deflated,
    ] {
        let p = write(
            &d.join("data.npz"),
            &npz(&[("x.npy", x.clone()), ("y.npy", y.clone())], method),
        );
        let got = data::load_npz(&p, &["y", "x"], &CPU).unwrap();
        assert_eq!(got[0].to_vec1::<f32>().unwrap(), vec![7., 9.]);
        assert_eq!(
            got[1].to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert_eq!(
            text(data::load_npz(&p, &["x", "z"], &CPU)),
            format!(
                "data: {}: no array named `z`; the archive has [\"x\", \"y\"]",
                p.display()
            )
        );
    }
    let p = write(
        &d.join("scalar.npz"),
        &npz(
            &[("x.npy", npy("<f4", false, "()", &f32s(&[1.])))],
            zip::CompressionMethod::Stored,
        ),
    );
    let e = text(data::load_npz(&p, &["x"], &CPU));
    assert!(
        e.starts_with(&format!(
            "data: {}: array `x`: the entry holds a 0-d array (a scalar)",
            p.display()
        )),
        "{e}"
    );
    let bad = npy("<f4", false, "(3,)", &f32s(&[1., 2.]));
    let p = write(
        &d.join("short.npz"),
        &npz(&[("x.npy", bad)], zip::CompressionMethod::Deflated),
    );
    let e = text(data::load_npz(&p, &["x"], &CPU));
    assert!(
        e.starts_with(&format!(
            "data: {}: array `x`: the NPY header says shape [3]",
            p.display()
        )),
        "{e}"
    );
    let p = write(&d.join("garbage.npz"), b"PK\x03\x04 not really");
    assert!(text(data::load_npz(&p, &["x"], &CPU))
        .contains("garbage.npz: not a readable NPZ (zip) archive"));
}

#[test]
fn npz_checksum_is_verified() {
    let d = dir("npz-crc");
    let marker = [1.25f32, 2.5, 3.75, 5.0];
    let x = npy("<f4", false, "(4,)", &f32s(&marker));
    let mut archive = npz(&[("x.npy", x)], zip::CompressionMethod::Stored);
    let p = write(&d.join("ok.npz"), &archive);
    assert_eq!(
        data::load_npz(&p, &["x"], &CPU).unwrap()[0]
            .to_vec1::<f32>()
            .unwrap(),
        marker.to_vec()
    );
    // Flip one bit of the stored data: the CRC32 no longer matches.
    let needle = f32s(&marker);
    let at = archive
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    archive[at + 5] ^= 0x01;
    let p = write(&d.join("flipped.npz"), &archive);
    let e = text(data::load_npz(&p, &["x"], &CPU));
    assert!(
        e.starts_with(&format!(
            "data: {}: array `x`: cannot read the entry: Invalid checksum",
            p.display()
        )),
        "{e}"
    );
}

/// Offsets of `sig` in `bytes`.
fn find_all(bytes: &[u8], sig: &[u8]) -> Vec<usize> {
    bytes
        .windows(sig.len())
        .enumerate()
        .filter(|(_, w)| *w == sig)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn npz_entries_claiming_absurd_sizes_are_refused_before_reading() {
    let d = dir("npz-bomb");
    let x = npy("<f4", false, "(4,)", &f32s(&[0.; 4]));
    for method in [
        zip::CompressionMethod::Stored,
        zip::CompressionMethod::Deflated,
    ] {
        let mut archive = npz(&[("x.npy", x.clone())], method);
        // Uncompressed size: at 22 in the local header, at 24 in the central directory entry.
        for at in find_all(&archive, b"PK\x03\x04") {
            archive[at + 22..at + 26].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        }
        for at in find_all(&archive, b"PK\x01\x02") {
            archive[at + 24..at + 28].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        }
        let p = write(&d.join("bomb.npz"), &archive);
        let e = text(data::load_npz(&p, &["x"], &CPU));
        let want = if method == zip::CompressionMethod::Stored {
            "the stored entry claims 2147418112 bytes but occupies"
        } else {
            "more than deflate can expand to"
        };
        assert!(
            e.contains("bomb.npz: array `x`: ") && e.contains(want),
            "{e}"
        );
        let small = ReadOptions::default().max_bytes(1 << 20);
        let e = text(data::load_npz_with(&p, &["x"], &small, &CPU));
        assert!(e.contains("over the limit of 1048576"), "{e}");
    }
}

fn idx(kind: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_files_plain_and_gzip() {
    let d = dir("idx");
    let f = idx(0x08, &[2, 3], &[0, 1, 2, 3, 4, 255]);
    for (name, bytes) in [("x.idx", f.clone()), ("x.idx.gz", gz(&f))] {
        let p = write(&d.join(name), &bytes);
        assert_eq!(
            data::load_idx(&p, &CPU).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 255.]]
        );
    }
    let p = write(&d.join("scalar.idx"), &idx(0x08, &[], &[5]));
    assert!(text(data::load_idx(&p, &CPU)).starts_with(&format!(
        "data: {}: the IDX header has 0 dimensions",
        p.display()
    )));
    // 60 000 images of 2^16 × 2^16 claimed by a 20-byte gzip file.
    let p = write(
        &d.join("huge.idx.gz"),
        &gz(&idx(0x08, &[60000, 65536, 65536], &[1, 2, 3])),
    );
    assert!(text(data::load_idx(&p, &CPU))
        .contains("huge.idx.gz: the IDX header's dims [60000, 65536, 65536] claim more than"));
    let p = write(&d.join("short.idx"), &idx(0x08, &[4], &[1, 2]));
    assert_eq!(
        text(data::load_idx(&p, &CPU)),
        format!(
            "data: {}: truncated: dims [4] need 4 bytes of data, the file has 2",
            p.display()
        )
    );
}

#[test]
fn csv_errors_name_file_row_and_column() {
    let d = dir("csv");
    let p = write(&d.join("t.csv"), b"a,b,y\n1,2,0\n3,nan,1\n");
    assert_eq!(
        text(data::load_csv(&p, &["y".into()], &CPU)),
        format!(
            "data: {}: row 3, column `b`: `nan` is not a finite number: fix the data, \
             or allow non-finite values (`allow_non_finite = true` in the run file's [data] table, \
             ReadOptions::allow_non_finite in code)",
            p.display()
        )
    );
    let lenient = ReadOptions::default().allow_non_finite(true);
    let data = data::load_csv_with(&p, &["y".into()], &lenient, &CPU).unwrap();
    let x = data.inputs()[0].to_vec2::<f32>().unwrap();
    assert!(x[1][1].is_nan() && x[0] == vec![1., 2.]);
    assert_eq!(data.targets()[0].to_vec1::<f32>().unwrap(), vec![0., 1.]);
    for (cell, what) in [
        ("inf", "`inf` is not a finite number"),
        ("-inf", "`-inf` is not a finite number"),
        ("NaN", "`NaN` is not a finite number"),
        ("1e39", "`1e39` is beyond what f32 holds"),
    ] {
        let p = write(
            &d.join("cell.csv"),
            format!("a,y\n1,0\n\n{cell},1\n").as_bytes(),
        );
        // Rows are lines in the file, and the blank line counts: the bad cell is on row 4.
        let want = format!("data: {}: row 4, column `a`: {what}", p.display());
        let e = text(data::load_csv(&p, &["y".into()], &CPU));
        assert!(e.starts_with(&want), "{e}");
        let e = text(data::load_csv_features(&p, &CPU));
        assert!(e.starts_with(&want), "{e}");
        assert!(data::load_csv_features_with(&p, &lenient, &CPU).is_ok());
    }
    let p = write(&d.join("quoted.csv"), b"a,y\n\"1\n\",0\n2,x\n");
    assert!(
        text(data::load_csv_features(&p, &CPU)).contains("row 4, column `y`: `x` is not a number")
    );
    let p = write(&d.join("ragged.csv"), b"a,y\n1,0\n2\n");
    assert!(text(data::load_csv(&p, &["y".into()], &CPU))
        .contains("row 3 has 1 fields, the header has 2"));
    let p = write(&d.join("empty-cell.csv"), b"a,y\n,0\n");
    assert!(text(data::load_csv(&p, &["y".into()], &CPU)).contains("row 2, column `a`: is empty"));
    let p = write(&d.join("dup.csv"), b"a,y,y\n1,0,0\n");
    assert!(text(data::load_csv(&p, &["y".into()], &CPU)).contains("several columns named `y`"));
    let p = write(&d.join("twice.csv"), b"a,y\n1,0\n");
    assert!(text(data::load_csv(&p, &["y".into(), "y".into()], &CPU))
        .contains("label column `y` is given twice"));
    let p = write(&d.join("empty.csv"), b"");
    assert!(text(data::load_csv_features(&p, &CPU)).contains("no header row"));
    let p = write(&d.join("header-only.csv"), b"a,y\n");
    assert!(text(data::load_csv(&p, &["y".into()], &CPU)).contains("no data rows"));
}

#[test]
fn datasets_of_views_select_and_split() {
    let table = Tensor::arange(0f32, 40., &CPU)
        .unwrap()
        .reshape((10, 4))
        .unwrap();
    let y = Tensor::arange(0u32, 10, &CPU).unwrap();
    // A column slice and a transposed view: neither is contiguous.
    let narrow = table.narrow(1, 1, 2).unwrap();
    let data = Dataset::new(narrow, y.clone()).unwrap();
    let picked = data.select(&[9, 0]).unwrap();
    assert_eq!(
        picked.inputs()[0].to_vec2::<f32>().unwrap(),
        vec![vec![37., 38.], vec![1., 2.]]
    );
    let (train, val) = data.shuffled_split(0.3, 1).unwrap();
    assert_eq!((train.len(), val.len()), (7, 3));
    let mut seen: Vec<u32> = train.targets()[0].to_vec1::<u32>().unwrap();
    seen.extend(val.targets()[0].to_vec1::<u32>().unwrap());
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    // Rows follow their inputs: input row r starts with 4r + 1.
    let x = val.inputs()[0].to_vec2::<f32>().unwrap();
    for (row, label) in x.iter().zip(val.targets()[0].to_vec1::<u32>().unwrap()) {
        assert_eq!(row[0], (4 * label + 1) as f32);
    }
    let t = Tensor::arange(0f32, 40., &CPU)
        .unwrap()
        .reshape((4, 10))
        .unwrap()
        .t()
        .unwrap();
    let data = Dataset::new(t, y).unwrap();
    assert_eq!(
        data.select(&[2]).unwrap().inputs()[0]
            .to_vec2::<f32>()
            .unwrap(),
        vec![vec![2., 12., 22., 32.]]
    );
    assert!(
        text(data.select(&[10])).contains("row 10 is out of range: the data set has 10 samples")
    );
}

#[test]
fn write_predictions_refuses_what_it_cannot_write() {
    let d = dir("pred");
    let p = d.join("p.csv");
    let two = Tensor::zeros((2, 1), DType::F32, &CPU).unwrap();
    let three = Tensor::zeros(3, DType::F32, &CPU).unwrap();
    let scalar = Tensor::new(1f32, &CPU).unwrap();
    let names = |n: usize| (0..n).map(|i| format!("o{i}")).collect::<Vec<_>>();
    let e = text(data::write_predictions(
        &p,
        &names(1),
        std::slice::from_ref(&scalar),
    ));
    assert!(e.contains("an output is 0-d"), "{e}");
    let e = text(data::write_predictions(
        &p,
        &names(2),
        &[two.clone(), three],
    ));
    assert!(
        e.contains("outputs have different row counts (2 and 3)"),
        "{e}"
    );
    let e = text(data::write_predictions(
        &p,
        &names(1),
        &[two.clone(), two.clone()],
    ));
    assert!(e.contains("1 output names for 2 outputs"), "{e}");
    assert!(!p.exists());
    data::write_predictions(&p, &names(2), &[two.clone(), two]).unwrap();
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        "o0_0,o1_0\n0,0\n0,0\n"
    );
}

/// An archive of nothing but a ZIP64 end-of-central-directory record claiming `entries` entries
/// in a directory of `size` bytes at `offset`, its locator and the classic record pointing to it.
fn zip64_claiming(entries: u64, size: u64, offset: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(0x0606_4b50u32.to_le_bytes());
    b.extend(44u64.to_le_bytes());
    b.extend(45u16.to_le_bytes());
    b.extend(45u16.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(entries.to_le_bytes());
    b.extend(entries.to_le_bytes());
    b.extend(size.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b.extend(0x0706_4b50u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend(0x0605_4b50u32.to_le_bytes());
    b.extend([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    b.extend([0xff; 8]);
    b.extend([0, 0]);
    b
}

/// Hostile inputs through the public functions that existed before this work; every one must be
/// an error, and none may panic. Returns (cases, panicked, accepted).
fn hostile_table() -> (usize, usize, Vec<String>) {
    let d = dir("hostile");
    let scalar = Tensor::new(1f32, &CPU).unwrap();
    let x = Tensor::zeros((4, 2), DType::F32, &CPU).unwrap();
    let y = Tensor::zeros(4, DType::F32, &CPU).unwrap();
    let wide = Tensor::zeros((4, 8), DType::F32, &CPU).unwrap();
    type Case = (&'static str, Box<dyn Fn() -> bool>);
    let file = |name: &str, bytes: Vec<u8>| write(&d.join(name), &bytes);
    let npy_case = |name: &'static str, bytes: Vec<u8>| -> Case {
        let p = file(name, bytes);
        (name, Box::new(move || data::load_npy(&p, &CPU).is_err()))
    };
    let npz_case = |name: &'static str, bytes: Vec<u8>| -> Case {
        let p = file(name, bytes);
        (
            name,
            Box::new(move || data::load_npz(&p, &["x"], &CPU).is_err()),
        )
    };
    let idx_case = |name: &'static str, bytes: Vec<u8>| -> Case {
        let p = file(name, bytes);
        (name, Box::new(move || data::load_idx(&p, &CPU).is_err()))
    };
    let csv_case = |name: &'static str, bytes: &[u8]| -> Case {
        let p = file(name, bytes.to_vec());
        let q = p.clone();
        (
            name,
            Box::new(move || {
                data::load_csv(&p, &["y".into()], &CPU).is_err()
                    && data::load_csv_features(&q, &CPU).is_err()
            }),
        )
    };
    let mut flipped = npz(
        &[(
            "x.npy",
            npy("<f4", false, "(4,)", &f32s(&[1.25, 2.5, 3.75, 5.])),
        )],
        zip::CompressionMethod::Stored,
    );
    let at = flipped
        .windows(4)
        .position(|w| w == 2.5f32.to_le_bytes())
        .unwrap();
    flipped[at] ^= 1;
    let (s1, x1, y1, w1) = (scalar.clone(), x.clone(), y.clone(), wide.clone());
    let (s2, x2) = (scalar.clone(), x.clone());
    let (x3, y3) = (x.clone(), y.clone());
    let cases: Vec<Case> = vec![
        (
            "Dataset::new(scalar x)",
            Box::new(move || Dataset::new(s1.clone(), y1.clone()).is_err()),
        ),
        (
            "Dataset::new(scalar y)",
            Box::new(move || Dataset::new(x2.clone(), s2.clone()).is_err()),
        ),
        (
            "Dataset::multi(no inputs)",
            Box::new(move || Dataset::multi(vec![], vec![x1.clone()]).is_err()),
        ),
        (
            "with_sample_weight(scalar)",
            Box::new(move || {
                Dataset::new(x3.clone(), y3.clone())
                    .unwrap()
                    .with_sample_weight(scalar.clone())
                    .is_err()
            }),
        ),
        (
            "select(out of range)",
            Box::new({
                let (x, y) = (x.clone(), y.clone());
                move || {
                    Dataset::new(x.clone(), y.clone())
                        .unwrap()
                        .select(&[4])
                        .is_err()
                }
            }),
        ),
        (
            "slice(usize::MAX len)",
            Box::new({
                let (x, y) = (x.clone(), y.clone());
                move || {
                    Dataset::new(x.clone(), y.clone())
                        .unwrap()
                        .slice(2, usize::MAX)
                        .is_err()
                }
            }),
        ),
        (
            "select on narrow view",
            Box::new({
                let (w, y) = (w1.clone(), y.clone());
                move || {
                    Dataset::new(w.narrow(1, 2, 3).unwrap(), y.clone())
                        .unwrap()
                        .select(&[0, 9])
                        .is_err()
                }
            }),
        ),
        (
            "shuffled_split(NaN) on t() view",
            Box::new({
                let w = w1.clone();
                move || {
                    Dataset::inputs_only(vec![w.t().unwrap()])
                        .unwrap()
                        .shuffled_split(f64::NAN, 0)
                        .is_err()
                }
            }),
        ),
        (
            "split_tail(-0.5)",
            Box::new({
                let x = x.clone();
                move || {
                    Dataset::inputs_only(vec![x.clone()])
                        .unwrap()
                        .split_tail(-0.5)
                        .is_err()
                }
            }),
        ),
        npy_case("scalar.npy", npy("<f4", false, "()", &f32s(&[1.]))),
        npy_case(
            "2pow40.npy",
            npy("<f4", false, "(1099511627776, 3)", &f32s(&[0.; 3])),
        ),
        npy_case(
            "overflow.npy",
            npy("<f8", false, "(18446744073709551615, 3)", &[]),
        ),
        npy_case("nan.npy", npy("<f4", false, "(2,)", &f32s(&[0., f32::NAN]))),
        npy_case("truncated.npy", npy("<f4", false, "(3,)", &f32s(&[0.]))),
        npy_case(
            "bad-dict.npy",
            b"\x93NUMPY\x01\x00\x08\x00{'a': 1}".to_vec(),
        ),
        npy_case("bad-version.npy", b"\x93NUMPY\x09\x00\x00\x00".to_vec()),
        npy_case("empty.npy", vec![]),
        npz_case("flipped.npz", flipped),
        npz_case(
            "scalar.npz",
            npz(
                &[("x.npy", npy("<f4", false, "()", &f32s(&[1.])))],
                zip::CompressionMethod::Stored,
            ),
        ),
        npz_case(
            "2pow40.npz",
            npz(
                &[(
                    "x.npy",
                    npy("<f4", false, "(1099511627776, 3)", &f32s(&[0.; 3])),
                )],
                zip::CompressionMethod::Deflated,
            ),
        ),
        npz_case(
            "nan.npz",
            npz(
                &[("x.npy", npy("<f4", false, "(1,)", &f32s(&[f32::INFINITY])))],
                zip::CompressionMethod::Stored,
            ),
        ),
        npz_case(
            "missing.npz",
            npz(
                &[("y.npy", npy("<f4", false, "(1,)", &f32s(&[1.])))],
                zip::CompressionMethod::Stored,
            ),
        ),
        npz_case("not-zip.npz", b"PK\x05\x06".to_vec()),
        npz_case(
            "zip64-claims.npz",
            zip64_claiming(1 << 40, 1 << 50, 1 << 45),
        ),
        npz_case(
            "zip64-claims-small-offset.npz",
            zip64_claiming(1 << 40, 1 << 50, 0),
        ),
        npz_case(
            "zip64-claims-fitting.npz",
            zip64_claiming(1 << 20, 46 << 20, 100),
        ),
        idx_case("rank0.idx", idx(0x08, &[], &[1])),
        idx_case("overflow.idx", idx(0x0E, &[u32::MAX; 4], &[])),
        idx_case(
            "huge.idx.gz",
            gz(&idx(0x08, &[60000, 65536, 65536], &[1, 2, 3])),
        ),
        idx_case("long.idx.gz", gz(&idx(0x08, &[2], &[0; 100]))),
        idx_case("nan.idx", idx(0x0D, &[1], &f32::NAN.to_be_bytes())),
        idx_case("truncated-header.idx", vec![0, 0, 8, 3, 0, 0]),
        csv_case("nan.csv", b"a,y\nnan,0\n"),
        csv_case("inf.csv", b"a,y\n1,inf\n"),
        csv_case("overflow.csv", b"a,y\n1e39,0\n"),
        csv_case("ragged.csv", b"a,y\n1\n"),
        csv_case("empty.csv", b""),
    ];
    let n = cases.len();
    let (mut panicked, mut accepted) = (0, Vec::new());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (name, case) in &cases {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)) {
            Ok(true) => {}
            Ok(false) => accepted.push(name.to_string()),
            Err(_) => {
                panicked += 1;
                accepted.push(format!("{name} (panicked)"));
            }
        }
    }
    std::panic::set_hook(hook);
    (n, panicked, accepted)
}

#[test]
fn hostile_inputs_are_errors_and_never_panic() {
    let (n, panicked, accepted) = hostile_table();
    println!("hostile inputs: {n} cases, {panicked} panicked, not refused: {accepted:?}");
    assert_eq!(n, 37);
    assert!(
        accepted.is_empty(),
        "{panicked} of {n} panicked; not refused: {accepted:?}"
    );
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
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
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(
        ms in prop::collection::vec(mutation(), 1..4),
        junk in prop::collection::vec(any::<u8>(), 0..96),
        deflate in any::<bool>(),
    ) {
        let d = dir("prop");
        let x = npy("<f4", false, "(2, 2)", &f32s(&[1., 2., 3., 4.]));
        let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
        let archive = npz(&[("x.npy", x.clone()), ("y.npy", npy("|u1", false, "(2,)", &[0, 1]))], method);
        let p = write(&d.join("m.npy"), &mutate(x, &ms));
        if let Ok(t) = data::load_npy(&p, &CPU) {
            prop_assert!(t.rank() > 0);
        }
        let p = write(&d.join("m.npz"), &mutate(archive, &ms));
        if let Ok(ts) = data::load_npz(&p, &["x", "y"], &CPU) {
            prop_assert_eq!(ts.len(), 2);
        }
        let p = write(&d.join("m.idx"), &mutate(gz(&idx(0x0D, &[2, 1], &[0x3f, 0x80, 0, 0, 0, 0, 0, 0])), &ms));
        let _ = data::load_idx(&p, &CPU);
        let p = write(&d.join("m.csv"), &mutate(b"a,b,y\n1,2,0\n3.5,-4,1\n".to_vec(), &ms));
        if let Ok(data) = data::load_csv(&p, &["y".into()], &CPU) {
            prop_assert_eq!(data.inputs()[0].dims()[0], data.targets()[0].dims()[0]);
        }
        let _ = data::load_csv_features(&p, &CPU);
        for (name, bytes) in [("j.npy", junk.clone()), ("j.npz", junk.clone()), ("j.idx", junk.clone())] {
            let p = write(&d.join(name), &bytes);
            let _ = data::load_npy(&p, &CPU);
            let _ = data::load_npz(&p, &["x"], &CPU);
            let _ = data::load_idx(&p, &CPU);
            let _ = data::load_csv_features(&p, &CPU);
        }
    }
}
