//! A small .npy reader and writer: format versions 1.0, 2.0 (and 3.0, which only differs in
//! allowing UTF-8 in the header), little-endian, C order, plain numeric dtypes.
//!
//! The reader treats the file as untrusted: the header is parsed by a strict little parser
//! (a Python dict literal with exactly the keys `descr`, `fortran_order` and `shape`), every
//! size product is checked for overflow, and the data length must equal what the header
//! promises *before* anything is allocated for it, so a lying header cannot make us allocate.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use vistok::{bf16, f16};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy itself refuses headers over 10 000 bytes by default; ours are ~100 bytes, so a
/// larger limit only guards against allocating whatever a corrupt length field says.
const MAX_HEADER_LEN: usize = 64 * 1024;
/// numpy ≥ 1.17 pads the header so the data starts on a 64-byte boundary (for memory mapping).
const ALIGN: usize = 64;

/// An element type that can be stored in a .npy file.
pub trait NpyElem: bytemuck::Pod {
    /// The `descr` string numpy writes for this type.
    const DESCR: &'static str;
}

impl NpyElem for u8 {
    const DESCR: &'static str = "|u1";
}
impl NpyElem for f16 {
    const DESCR: &'static str = "<f2";
}
impl NpyElem for f32 {
    const DESCR: &'static str = "<f4";
}
impl NpyElem for i32 {
    const DESCR: &'static str = "<i4";
}
impl NpyElem for i64 {
    const DESCR: &'static str = "<i8";
}
impl NpyElem for u32 {
    const DESCR: &'static str = "<u4";
}

/// The typed contents of a .npy file.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    U8(Vec<u8>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U32(Vec<u32>),
}

impl NpyData {
    /// The numpy `descr` of this data, for messages.
    pub fn descr(&self) -> &'static str {
        match self {
            NpyData::U8(_) => u8::DESCR,
            NpyData::F16(_) => f16::DESCR,
            NpyData::F32(_) => f32::DESCR,
            NpyData::I32(_) => i32::DESCR,
            NpyData::I64(_) => i64::DESCR,
            NpyData::U32(_) => u32::DESCR,
        }
    }
}

/// A dense C-order array read from a .npy file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

/// Reads `path`. Every error names the file and what was wrong with it.
pub fn read(path: &Path) -> Result<NpyArray, String> {
    let at = |msg: String| format!("{}: {msg}", path.display());
    let mut file = File::open(path).map_err(|e| at(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| at(format!("cannot stat: {e}")))?.len();
    let (header, header_len) = read_header(&mut file).map_err(at)?;
    let elem = elem_size(header.dtype);
    let numel = checked_numel(&header.shape).ok_or_else(|| at(format!("shape {:?} overflows", header.shape)))?;
    let nbytes = numel.checked_mul(elem).ok_or_else(|| at(format!("shape {:?} overflows", header.shape)))?;
    let data_len = file_len.saturating_sub(header_len as u64);
    if data_len != nbytes as u64 {
        return Err(at(format!(
            "the header promises {nbytes} bytes of data (shape {:?}, dtype {}), the file holds {data_len}",
            header.shape,
            header.dtype.descr()
        )));
    }
    let data = match header.dtype {
        Dtype::U8 => NpyData::U8(read_data(&mut file, numel).map_err(at)?),
        Dtype::F16 => NpyData::F16(read_data(&mut file, numel).map_err(at)?),
        Dtype::F32 => NpyData::F32(read_data(&mut file, numel).map_err(at)?),
        Dtype::I32 => NpyData::I32(read_data(&mut file, numel).map_err(at)?),
        Dtype::I64 => NpyData::I64(read_data(&mut file, numel).map_err(at)?),
        Dtype::U32 => NpyData::U32(read_data(&mut file, numel).map_err(at)?),
    };
    Ok(NpyArray { shape: header.shape, data })
}

/// Writes a .npy header for `descr` and `shape` (version 1.0 unless the header needs 2.0).
pub fn write_header(w: &mut impl Write, descr: &str, shape: &[usize]) -> io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // Python's tuple syntax: a 1-tuple needs its trailing comma.
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    // magic + version + length field + dict + padding + '\n' must be a multiple of ALIGN;
    // version 1.0 has a u16 length field, 2.0 a u32 one.
    let padded = |prefix: usize| (prefix + dict.len() + 1).div_ceil(ALIGN) * ALIGN;
    let v1 = padded(MAGIC.len() + 4) - (MAGIC.len() + 4) <= u16::MAX as usize;
    let prefix = MAGIC.len() + 2 + if v1 { 2 } else { 4 };
    let total = padded(prefix);
    dict.extend(std::iter::repeat_n(' ', total - prefix - dict.len() - 1));
    dict.push('\n');
    w.write_all(MAGIC)?;
    if v1 {
        w.write_all(&[1, 0])?;
        // Fits: checked by `v1`.
        w.write_all(&(dict.len() as u16).to_le_bytes())?;
    } else {
        let len = u32::try_from(dict.len()).map_err(|_| io::Error::other("npy header too long"))?;
        w.write_all(&[2, 0])?;
        w.write_all(&len.to_le_bytes())?;
    }
    w.write_all(dict.as_bytes())
}

/// Writes `data` with `shape` as a .npy file.
pub fn write<T: NpyElem>(w: &mut impl Write, shape: &[usize], data: &[T]) -> io::Result<()> {
    write_header(w, T::DESCR, shape)?;
    w.write_all(&to_le(bytemuck::cast_slice(data), std::mem::size_of::<T>()))
}

/// Writes bf16 `data` as `<f4` (numpy has no bf16); widening is exact, so the file holds the
/// bf16 values themselves, NaN payloads included.
pub fn write_bf16_as_f32(w: &mut impl Write, shape: &[usize], data: &[bf16]) -> io::Result<()> {
    write_header(w, f32::DESCR, shape)?;
    let mut buf = Vec::with_capacity(4 * 4096);
    for chunk in data.chunks(4096) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|x| x.to_f32().to_le_bytes()));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// The dtypes this reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U8,
    F16,
    F32,
    I32,
    I64,
    U32,
}

impl Dtype {
    fn descr(self) -> &'static str {
        match self {
            Dtype::U8 => u8::DESCR,
            Dtype::F16 => f16::DESCR,
            Dtype::F32 => f32::DESCR,
            Dtype::I32 => i32::DESCR,
            Dtype::I64 => i64::DESCR,
            Dtype::U32 => u32::DESCR,
        }
    }

    fn parse(descr: &str) -> Result<Dtype, String> {
        Ok(match descr {
            // One-byte types have no byte order; numpy writes `|`, hand-made files may not.
            "|u1" | "<u1" | "u1" => Dtype::U8,
            "<f2" => Dtype::F16,
            "<f4" => Dtype::F32,
            "<i4" => Dtype::I32,
            "<i8" => Dtype::I64,
            "<u4" => Dtype::U32,
            d if d.starts_with('>') => {
                return Err(format!(
                "big-endian dtype '{d}' is not supported (save it little-endian: a.astype(a.dtype.newbyteorder('<')))"
            ))
            }
            d => return Err(format!("dtype '{d}' is not supported (expected one of |u1, <f2, <f4, <i4, <i8, <u4)")),
        })
    }
}

fn elem_size(d: Dtype) -> usize {
    match d {
        Dtype::U8 => 1,
        Dtype::F16 => 2,
        Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
        Dtype::I64 => 8,
    }
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

#[derive(Debug, PartialEq)]
struct Header {
    dtype: Dtype,
    shape: Vec<usize>,
}

/// Reads and validates the preamble and header; returns it with its length in bytes
/// (where the data starts).
fn read_header(r: &mut impl Read) -> Result<(Header, usize), String> {
    let mut pre = [0u8; 8];
    read_exact(r, &mut pre, "the .npy preamble")?;
    if &pre[..6] != MAGIC {
        return Err("not a .npy file (bad magic bytes)".into());
    }
    let (major, minor) = (pre[6], pre[7]);
    let len_size = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => return Err(format!(".npy format version {major}.{minor} is not supported (1.0, 2.0, 3.0 are)")),
    };
    let mut len_bytes = [0u8; 4];
    read_exact(r, &mut len_bytes[..len_size], "the header length")?;
    let header_len = u32::from_le_bytes(len_bytes) as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"));
    }
    let mut text = vec![0u8; header_len];
    read_exact(r, &mut text, "the header")?;
    // Versions 1 and 2 are latin-1, 3 is UTF-8; every valid header we accept is ASCII.
    let text = std::str::from_utf8(&text).map_err(|_| "the header is not ASCII text".to_string())?;
    let header = parse_header(text).map_err(|e| format!("malformed header: {e}"))?;
    Ok((header, 8 + len_size + header_len))
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), String> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("truncated file: it ends inside {what}"),
        _ => format!("cannot read {what}: {e}"),
    })
}

/// Reads `numel` little-endian elements. The caller has checked that the file holds exactly
/// that many bytes, so the allocation is backed by real data.
fn read_data<T: NpyElem>(r: &mut impl Read, numel: usize) -> Result<Vec<T>, String> {
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(numel).map_err(|_| format!("out of memory allocating {numel} elements of {}", T::DESCR))?;
    v.resize(numel, T::zeroed());
    read_exact(r, bytemuck::cast_slice_mut(&mut v), "the data")?;
    if cfg!(target_endian = "big") {
        for e in bytemuck::cast_slice_mut::<T, u8>(&mut v).chunks_exact_mut(std::mem::size_of::<T>()) {
            e.reverse();
        }
    }
    Ok(v)
}

/// The bytes of `bytes` (elements of `size` bytes, native order) in little-endian order.
fn to_le(bytes: &[u8], size: usize) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") || size == 1 {
        return Cow::Borrowed(bytes);
    }
    let mut v = bytes.to_vec();
    for e in v.chunks_exact_mut(size) {
        e.reverse();
    }
    Cow::Owned(v)
}

/// The parsed value of one header key.
#[derive(Debug, PartialEq)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses numpy's header: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`
/// followed by padding. Exactly those three keys, each once.
fn parse_header(text: &str) -> Result<Header, String> {
    let mut p = Lexer { s: text.as_bytes(), i: 0 };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        if !["descr", "fortran_order", "shape"].contains(&key.as_str()) {
            return Err(format!("unexpected key '{key}'"));
        }
        p.expect(b':')?;
        if key == "descr" && p.peek() == Some(b'[') {
            return Err("structured dtypes are not supported".into());
        }
        let value = p.value()?;
        let slot_taken = match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", Value::Bool(b)) => fortran.replace(b).is_some(),
            ("shape", Value::Tuple(t)) => shape.replace(t).is_some(),
            ("descr", _) => return Err("'descr' must be a string (structured dtypes are not supported)".into()),
            ("fortran_order", _) => return Err("'fortran_order' must be True or False".into()),
            ("shape", _) => return Err("'shape' must be a tuple of integers".into()),
            (k, _) => return Err(format!("unexpected key '{k}'")), // unreachable: checked above
        };
        if slot_taken {
            return Err(format!("key '{key}' appears twice"));
        }
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err("unexpected text after the header dict".into());
    }
    let descr = descr.ok_or("missing key 'descr'")?;
    let fortran = fortran.ok_or("missing key 'fortran_order'")?;
    let shape = shape.ok_or("missing key 'shape'")?;
    if fortran {
        return Err("Fortran-order arrays are not supported (save a C-order array: np.ascontiguousarray(a))".into());
    }
    Ok(Header { dtype: Dtype::parse(&descr)?, shape })
}

/// A byte cursor over the header text with the few token rules a numpy header needs.
struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            return true;
        }
        false
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            return Ok(());
        }
        Err(match self.peek() {
            Some(got) => format!("expected '{}' at byte {}, found '{}'", c as char, self.i, got.escape_ascii()),
            None => format!("expected '{}' at byte {}, found the end", c as char, self.i),
        })
    }

    /// A quoted string without escapes (numpy's dtype strings and keys have none).
    fn string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at byte {}", self.i)),
        };
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == quote).ok_or("unterminated string")?;
        let body = &self.s[start..start + len];
        if body.contains(&b'\\') {
            return Err("escapes in header strings are not supported".into());
        }
        self.i = start + len + 1;
        // The header was checked to be UTF-8 and we split at ASCII quotes, so this holds.
        Ok(String::from_utf8_lossy(body).into_owned())
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some(b'\'' | b'"') => Ok(Value::Str(self.string()?)),
            Some(b'(') => self.tuple().map(Value::Tuple),
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"True" => Ok(Value::Bool(true)),
                    b"False" => Ok(Value::Bool(false)),
                    w => Err(format!("unexpected word '{}'", w.escape_ascii())),
                }
            }
            Some(c) => Err(format!("unexpected '{}' at byte {}", c.escape_ascii(), self.i)),
            None => Err("unexpected end of the header".into()),
        }
    }

    /// `()`, `(n,)`, `(n, m)`, `(n, m,)`: non-negative integers only.
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = vec![];
        loop {
            if self.eat(b')') {
                return Ok(dims);
            }
            dims.push(self.integer()?);
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }

    fn integer(&mut self) -> Result<usize, String> {
        self.skip_ws();
        let start = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        if start == self.i {
            return Err(format!("expected a non-negative integer at byte {start}"));
        }
        // Digits only, so this is ASCII; `parse` reports overflow.
        let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
        digits.parse().map_err(|_| format!("dimension {digits} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: NpyElem>(shape: &[usize], data: &[T]) -> (Header, usize, Vec<u8>) {
        let mut buf = vec![];
        write(&mut buf, shape, data).unwrap();
        let (h, len) = read_header(&mut &buf[..]).unwrap();
        (h, len, buf)
    }

    #[test]
    fn header_round_trips_and_aligns() {
        for shape in [vec![], vec![5], vec![2, 3], vec![1, 2, 3, 4, 5, 6]] {
            let n: usize = shape.iter().product();
            let (h, len, buf) = roundtrip(&shape, &vec![1.5f32; n]);
            assert_eq!(h, Header { dtype: Dtype::F32, shape: shape.clone() });
            assert_eq!(len % ALIGN, 0);
            assert_eq!(buf.len(), len + 4 * n);
        }
    }

    #[test]
    fn parses_numpy_variants() {
        let ok = [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n",
            "{\"shape\":(2,3),\"fortran_order\":False,\"descr\":\"<f4\"}",
            "{'descr':'<f4','fortran_order':False,'shape':(2,3,)}",
        ];
        for t in ok {
            assert_eq!(parse_header(t).unwrap(), Header { dtype: Dtype::F32, shape: vec![2, 3] }, "{t}");
        }
        assert_eq!(parse_header("{'descr': '|u1', 'fortran_order': False, 'shape': (7,), }").unwrap().shape, [7]);
        assert_eq!(
            parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (), }").unwrap().shape,
            Vec::<usize>::new()
        );
    }

    #[test]
    fn rejects_bad_headers() {
        let bad = [
            ("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", "big-endian"),
            ("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", "Fortran"),
            ("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", "not supported"),
            ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", "structured"),
            ("{'descr': '<f4', 'shape': (2,), }", "missing key 'fortran_order'"),
            ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", "twice"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", "unexpected"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", "integer"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }", "too large"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", "end"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } x", "after"),
            ("{'descr: '<f4'", "expected"),
            ("", "end"),
        ];
        for (t, want) in bad {
            let e = parse_header(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_not_a_panic() {
        let (_, _, buf) = roundtrip(&[2, 3], &[1u8, 2, 3, 4, 5, 6]);
        for n in 0..buf.len() {
            let _ = read_header(&mut &buf[..n]);
        }
        for i in 0..buf.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = buf.clone();
                b[i] ^= flip;
                let _ = read_header(&mut &b[..]);
            }
        }
    }

    #[test]
    fn bf16_is_written_as_exact_f32() {
        let data = [bf16::from_f32(1.0), bf16::from_f32(-3.5), bf16::NAN];
        let mut buf = vec![];
        write_bf16_as_f32(&mut buf, &[3], &data).unwrap();
        let (h, len) = read_header(&mut &buf[..]).unwrap();
        assert_eq!(h.dtype, Dtype::F32);
        let vals: Vec<f32> = buf[len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(vals[..2], [1.0, -3.5]);
        assert_eq!(vals[2].to_bits(), data[2].to_f32().to_bits());
    }
}
