//! kiln's own NPY and NPZ readers. Nothing is allocated for what a header merely claims: the
//! byte size of the array is computed with checked arithmetic from the header and must equal the
//! bytes that are really there before any value is read. Every error is a plain message; the
//! caller puts the file (and the array) in front of it.

use super::files::ReadOptions;
use std::io::Read;

/// The element types numpy commonly writes, with their byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    Uint,
    Bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dtype {
    kind: Kind,
    size: usize,
    big_endian: bool,
}

/// A parsed NPY header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    dtype: Dtype,
    descr: String,
    fortran_order: bool,
    pub(crate) shape: Vec<usize>,
    /// Bytes before the data (magic, version, length and the dict).
    pub(crate) data_offset: usize,
    /// Bytes of data the shape and dtype need.
    pub(crate) data_bytes: u64,
}

/// The longest header kiln accepts (numpy itself refuses headers over 10 000 bytes by default).
const MAX_HEADER: usize = 1 << 20;

/// The first bytes of every NPY file.
const MAGIC: &[u8] = b"\x93NUMPY";

/// How many bytes a reader needs to know the header's full length.
pub(crate) const PREAMBLE: usize = 12;

/// The total header length (magic to the end of the dict) from the first bytes of a file, or
/// an error if they are not an NPY preamble. `first` may hold fewer than [`PREAMBLE`] bytes only
/// when the file is that short.
pub(crate) fn header_len(first: &[u8]) -> Result<usize, String> {
    if first.len() < MAGIC.len() || &first[..MAGIC.len()] != MAGIC {
        return Err("not an NPY file (it does not start with \\x93NUMPY)".into());
    }
    let version = first.get(6..8).ok_or("truncated NPY header (no version)")?;
    let len = match version[0] {
        1 => {
            let b = first.get(8..10).ok_or("truncated NPY header (no length)")?;
            10 + u16::from_le_bytes([b[0], b[1]]) as usize
        }
        2 | 3 => {
            let b = first.get(8..12).ok_or("truncated NPY header (no length)")?;
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if n > MAX_HEADER {
                return Err(format!(
                    "the NPY header claims {n} bytes, more than the {MAX_HEADER} kiln accepts: \
                     the file is damaged or not an NPY file"
                ));
            }
            12 + n
        }
        v => {
            return Err(format!(
                "NPY format version {v}.{} is not one kiln reads (1, 2 and 3 are)",
                version[1]
            ))
        }
    };
    Ok(len)
}

/// Parses the whole header, `bytes` holding at least [`header_len`] bytes.
pub(crate) fn parse_header(bytes: &[u8], options: &ReadOptions) -> Result<Header, String> {
    let total = header_len(bytes)?;
    let dict_start = if bytes[6] == 1 { 10 } else { 12 };
    let dict = bytes.get(dict_start..total).ok_or_else(|| {
        format!(
            "truncated NPY header: it claims {total} bytes, the data holds {}",
            bytes.len()
        )
    })?;
    let text = std::str::from_utf8(dict).map_err(|_| "the NPY header is not text".to_string())?;
    if bytes[6] < 3 && !text.is_ascii() {
        return Err("the NPY header is not ASCII (format versions 1 and 2 require it)".into());
    }
    let fields = parse_dict(text)?;
    let descr = fields.descr;
    let dtype = parse_descr(&descr)?;
    let count = fields
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| {
            format!(
                "the NPY header's shape {:?} has more elements than can be counted",
                fields.shape
            )
        })?;
    let data_bytes = count.checked_mul(dtype.size as u64).ok_or_else(|| {
        format!(
            "the NPY header's shape {:?} of `{descr}` needs more bytes than can be counted",
            fields.shape
        )
    })?;
    if data_bytes > options.max_bytes {
        return Err(format!(
            "the NPY header claims shape {:?} of `{descr}`, {data_bytes} bytes, over the limit of \
             {} bytes (ReadOptions::max_bytes): the file is damaged, or raise the limit",
            fields.shape, options.max_bytes
        ));
    }
    Ok(Header {
        dtype,
        descr,
        fortran_order: fields.fortran_order,
        shape: fields.shape,
        data_offset: total,
        data_bytes,
    })
}

struct Fields {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A strict parser for the Python dict literal numpy writes:
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }` padded with spaces and a
/// newline.
fn parse_dict(text: &str) -> Result<Fields, String> {
    let bad = |what: &str| format!("malformed NPY header ({what}): {:?}", shorten(text));
    let mut p = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    p.skip_ws();
    if !p.eat(b'{') {
        return Err(bad("it does not start with `{`"));
    }
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p
            .string()
            .ok_or_else(|| bad("a key is not a quoted string"))?;
        p.skip_ws();
        if !p.eat(b':') {
            return Err(bad("no `:` after a key"));
        }
        p.skip_ws();
        let duplicate = match key.as_str() {
            "descr" => {
                if p.peek() == Some(b'[') {
                    return Err(
                        "the array has a structured dtype (a list of fields); kiln reads plain \
                         numeric arrays: save each field as its own array"
                            .into(),
                    );
                }
                let v = p
                    .string()
                    .ok_or_else(|| bad("`descr` is not a quoted string"))?;
                descr.replace(v).is_some()
            }
            "fortran_order" => {
                let v = if p.word("True") {
                    true
                } else if p.word("False") {
                    false
                } else {
                    return Err(bad("`fortran_order` is not True or False"));
                };
                fortran.replace(v).is_some()
            }
            "shape" => {
                let v = p
                    .tuple()
                    .ok_or_else(|| bad("`shape` is not a tuple of non-negative integers"))?;
                shape.replace(v).is_some()
            }
            other => return Err(bad(&format!("unknown key `{other}`"))),
        };
        if duplicate {
            return Err(bad(&format!("key `{key}` appears twice")));
        }
        p.skip_ws();
        if p.eat(b',') {
            continue;
        }
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        return Err(bad("expected `,` or `}`"));
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(bad("text after the closing `}`"));
    }
    match (descr, fortran, shape) {
        (Some(descr), Some(fortran_order), Some(shape)) => Ok(Fields {
            descr,
            fortran_order,
            shape,
        }),
        _ => Err(bad(
            "it needs the keys 'descr', 'fortran_order' and 'shape'",
        )),
    }
}

fn shorten(text: &str) -> String {
    let t: String = text.chars().take(120).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn word(&mut self, w: &str) -> bool {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            let after = self.s.get(self.i + w.len()).copied();
            if !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                self.i += w.len();
                return true;
            }
        }
        false
    }
    /// A quoted string without escapes (numpy's keys and dtype strings have none).
    fn string(&mut self) -> Option<String> {
        let q = self.peek().filter(|&c| c == b'\'' || c == b'"')?;
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == q || c == b'\\')?;
        if self.s[start + len] != q {
            return None;
        }
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }
    fn int(&mut self) -> Option<usize> {
        let start = self.i;
        let mut v: usize = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v.checked_mul(10)?.checked_add((c - b'0') as usize)?;
            self.i += 1;
        }
        // Python 2 wrote long integers as `3L`.
        if self.i > start && self.peek() == Some(b'L') {
            self.i += 1;
        }
        (self.i > start).then_some(v)
    }
    /// `()`, `(3,)`, `(3, 4)` or `(3, 4,)`.
    fn tuple(&mut self) -> Option<Vec<usize>> {
        if !self.eat(b'(') {
            return None;
        }
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                // `(3)` is an int in Python, not a tuple.
                return Some(dims);
            }
            dims.push(self.int()?);
            self.skip_ws();
            if self.eat(b',') {
                continue;
            }
            if dims.len() > 1 && self.eat(b')') {
                return Some(dims);
            }
            return None;
        }
    }
}

fn parse_descr(descr: &str) -> Result<Dtype, String> {
    let unsupported = || {
        format!(
            "numpy dtype `{descr}` is not one kiln reads: save the array as float (f2, f4, f8), \
             signed or unsigned integers (1 to 8 bytes) or bool"
        )
    };
    let b = descr.as_bytes();
    if b.len() < 3 {
        return Err(unsupported());
    }
    let order = b[0];
    let kind = match b[1] {
        b'f' => Kind::Float,
        b'i' => Kind::Int,
        b'u' => Kind::Uint,
        b'b' => Kind::Bool,
        _ => return Err(unsupported()),
    };
    let size: usize = std::str::from_utf8(&b[2..])
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(unsupported)?;
    let valid = match kind {
        Kind::Float => matches!(size, 2 | 4 | 8),
        Kind::Int | Kind::Uint => matches!(size, 1 | 2 | 4 | 8),
        Kind::Bool => size == 1,
    };
    if !valid {
        return Err(unsupported());
    }
    let big_endian = match order {
        b'<' => false,
        b'>' => true,
        b'=' => cfg!(target_endian = "big"),
        b'|' if size == 1 => false,
        _ => return Err(unsupported()),
    };
    Ok(Dtype {
        kind,
        size,
        big_endian,
    })
}

/// An NPY array read to f32, in C (row-major) order.
#[derive(Debug)]
pub(crate) struct Array {
    pub(crate) shape: Vec<usize>,
    pub(crate) values: Vec<f32>,
}

/// Decodes `data` (exactly `header.data_bytes` long) to f32 in C order, refusing non-finite
/// values unless the options allow them.
pub(crate) fn decode(header: &Header, data: &[u8], options: &ReadOptions) -> Result<Array, String> {
    if data.len() as u64 != header.data_bytes {
        return Err(size_mismatch(header, data.len() as u64));
    }
    let d = header.dtype;
    let values: Vec<f32> = data.chunks_exact(d.size).map(|c| element(d, c)).collect();
    if d.kind == Kind::Float && !options.allow_non_finite {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let index = position(i, &header.shape, header.fortran_order);
            let raw = raw_float(d, &data[i * d.size..(i + 1) * d.size]);
            let what = if raw.is_finite() {
                format!("{raw:e}, beyond what f32 holds (±3.4e38)")
            } else {
                format!("{raw}")
            };
            return Err(format!(
                "the value at {index:?} (row {}) is {what}: fix the data, or allow non-finite \
                 values (`allow_non_finite = true` in the run file's [data] table, \
                 ReadOptions::allow_non_finite in code)",
                index.first().copied().unwrap_or(0)
            ));
        }
    }
    let values = if header.fortran_order && header.shape.len() > 1 {
        transpose_fortran(&values, &header.shape)
    } else {
        values
    };
    Ok(Array {
        shape: header.shape.clone(),
        values,
    })
}

pub(crate) fn size_mismatch(header: &Header, have: u64) -> String {
    format!(
        "the NPY header says shape {:?} of `{}`, {} bytes of data, but {have} bytes follow the \
         header: the file is truncated, damaged or not what its header says",
        header.shape, header.descr, header.data_bytes
    )
}

fn element(d: Dtype, c: &[u8]) -> f32 {
    macro_rules! num {
        ($t:ty) => {{
            let a = c.try_into().unwrap_or([0; std::mem::size_of::<$t>()]);
            (if d.big_endian {
                <$t>::from_be_bytes(a)
            } else {
                <$t>::from_le_bytes(a)
            }) as f32
        }};
    }
    match (d.kind, d.size) {
        (Kind::Bool, _) => (c[0] != 0) as u8 as f32,
        (Kind::Uint, 1) => c[0] as f32,
        (Kind::Int, 1) => c[0] as i8 as f32,
        (Kind::Uint, 2) => num!(u16),
        (Kind::Uint, 4) => num!(u32),
        (Kind::Uint, _) => num!(u64),
        (Kind::Int, 2) => num!(i16),
        (Kind::Int, 4) => num!(i32),
        (Kind::Int, _) => num!(i64),
        (Kind::Float, 2) => f16_to_f32(num!(u16) as u16),
        (Kind::Float, 4) => num!(f32),
        (Kind::Float, _) => num!(f64),
    }
}

/// The value as stored (f64 holds every f2/f4/f8 exactly), for messages.
fn raw_float(d: Dtype, c: &[u8]) -> f64 {
    match d.size {
        8 => {
            let a = c.try_into().unwrap_or([0; 8]);
            if d.big_endian {
                f64::from_be_bytes(a)
            } else {
                f64::from_le_bytes(a)
            }
        }
        _ => element(d, c) as f64,
    }
}

/// IEEE half precision to f32 (exact: every f16 is an f32).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => sign * man as f32 * (2f32).powi(-24),
        0x1f if man == 0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        _ => {
            f32::from_bits(((h as u32 & 0x8000) << 16) | (((exp + 112) as u32) << 23) | (man << 13))
        }
    }
}

/// The multi-index of the `i`-th stored element.
pub(crate) fn position(mut i: usize, shape: &[usize], fortran: bool) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    let axes: Vec<usize> = if fortran {
        (0..shape.len()).collect()
    } else {
        (0..shape.len()).rev().collect()
    };
    for a in axes {
        let d = shape[a].max(1);
        index[a] = i % d;
        i /= d;
    }
    index
}

/// Column-major values of `shape` to row-major.
fn transpose_fortran(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let rank = shape.len();
    // Strides of the Fortran layout.
    let mut strides = vec![1usize; rank];
    for a in 1..rank {
        strides[a] = strides[a - 1] * shape[a - 1];
    }
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0usize; rank];
    for _ in 0..values.len() {
        let src: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(values[src]);
        // Advance the C-order multi-index.
        for a in (0..rank).rev() {
            index[a] += 1;
            if index[a] < shape[a] {
                break;
            }
            index[a] = 0;
        }
    }
    out
}

/// Parses a whole NPY file held in memory.
pub(crate) fn parse(bytes: &[u8], options: &ReadOptions) -> Result<Array, String> {
    let header = parse_header(bytes, options)?;
    let data = &bytes[header.data_offset..];
    if data.len() as u64 != header.data_bytes {
        return Err(size_mismatch(&header, data.len() as u64));
    }
    decode(&header, data, options)
}

/// Reads an NPY stream of `len` bytes in all: the header first, then the data, which must be
/// exactly what the header describes (checked before the data is read).
pub(crate) fn read(mut r: impl Read, len: u64, options: &ReadOptions) -> Result<Array, ReadError> {
    let mut head = Vec::with_capacity(PREAMBLE);
    (&mut r)
        .take(PREAMBLE as u64)
        .read_to_end(&mut head)
        .map_err(ReadError::Io)?;
    let total = header_len(&head).map_err(ReadError::Format)?;
    if (total as u64) > len {
        return Err(ReadError::Format(format!(
            "truncated NPY header: it claims {total} bytes, the file holds {len}"
        )));
    }
    if head.len() < total {
        (&mut r)
            .take((total - head.len()) as u64)
            .read_to_end(&mut head)
            .map_err(ReadError::Io)?;
    }
    // A version-1 header can be shorter than the preamble read: the rest is data.
    let mut data = if head.len() > total {
        head.split_off(total)
    } else {
        Vec::new()
    };
    let header = parse_header(&head, options).map_err(ReadError::Format)?;
    let have = len - total as u64;
    if have != header.data_bytes {
        return Err(ReadError::Format(size_mismatch(&header, have)));
    }
    let missing = header.data_bytes.saturating_sub(data.len() as u64);
    data.reserve_exact(missing as usize);
    r.take(missing)
        .read_to_end(&mut data)
        .map_err(ReadError::Io)?;
    if data.len() as u64 != header.data_bytes {
        return Err(ReadError::Format(size_mismatch(&header, data.len() as u64)));
    }
    decode(&header, &data, options).map_err(ReadError::Format)
}

/// Why [`read`] failed: the operating system, or the content.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(std::io::Error),
    Format(String),
}
