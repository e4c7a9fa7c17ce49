//! The safetensors file format, free of Python: dtypes, header parsing with full validation,
//! header serialization.
//!
//! A file is `u64 little-endian N`, then N bytes of JSON (may be padded with spaces), then the
//! data section. Each JSON entry maps a tensor name to its dtype, shape and `data_offsets`
//! `[start, end)` relative to the data section; the optional `__metadata__` entry is a
//! string-to-string map.

use serde_json::{Map, Value};

/// The largest header we accept, as the reference implementation does.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
pub const METADATA_KEY: &str = "__metadata__";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

const ALL_DTYPES: [Dtype; 15] = [
    Dtype::Bool,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8E4M3,
    Dtype::F8E5M2,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::I64,
    Dtype::U64,
    Dtype::F64,
];

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        ALL_DTYPES.iter().copied().find(|d| d.name() == name)
    }

    pub fn known_names() -> String {
        ALL_DTYPES
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// The numpy dtype a view is made with. numpy has no bf16 or fp8: their bits come back as
    /// unsigned integers of the same width.
    pub fn numpy_str(self) -> &'static str {
        match self {
            Dtype::Bool => "|b1",
            Dtype::U8 | Dtype::F8E4M3 | Dtype::F8E5M2 => "|u1",
            Dtype::I8 => "|i1",
            Dtype::I16 => "<i2",
            Dtype::U16 | Dtype::BF16 => "<u2",
            Dtype::F16 => "<f2",
            Dtype::I32 => "<i4",
            Dtype::U32 => "<u4",
            Dtype::F32 => "<f4",
            Dtype::I64 => "<i8",
            Dtype::U64 => "<u8",
            Dtype::F64 => "<f8",
        }
    }

    /// The torch dtype to view the numpy bits as, where numpy lacks the type.
    pub fn torch_view(self) -> Option<&'static str> {
        match self {
            Dtype::BF16 => Some("bfloat16"),
            Dtype::F8E4M3 => Some("float8_e4m3fn"),
            Dtype::F8E5M2 => Some("float8_e5m2"),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the data section.
    pub start: u64,
    pub end: u64,
}

#[derive(Clone, Debug)]
pub struct Header {
    /// In the file's data order.
    pub tensors: Vec<(String, TensorInfo)>,
    pub metadata: Vec<(String, String)>,
    /// Absolute offset of the data section in the file.
    pub data_start: u64,
}

/// Element count times item size, or None on overflow.
pub fn byte_count(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

/// Parses and validates the header of a whole file's bytes. Errors are messages without the
/// file name (the caller adds it).
pub fn parse_header(file: &[u8]) -> Result<Header, String> {
    let file_len = file.len() as u64;
    if file_len < 8 {
        return Err(format!(
            "truncated: {file_len} bytes, shorter than the 8-byte header length field"
        ));
    }
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)"
        ));
    }
    if header_len > file_len - 8 {
        return Err(format!(
            "truncated or corrupt: header length {header_len} runs past the end of the file \
             ({file_len} bytes)"
        ));
    }
    let data_start = 8 + header_len;
    let text = std::str::from_utf8(&file[8..data_start as usize])
        .map_err(|e| format!("header is not valid UTF-8: {e}"))?;
    if !text.starts_with('{') {
        return Err("header does not start with '{' (not a safetensors file?)".into());
    }
    let json: Value =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let Value::Object(entries) = json else {
        return Err("header JSON is not an object".into());
    };
    let data_len = file_len - data_start;
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == METADATA_KEY {
            metadata = parse_metadata(entry)?;
            continue;
        }
        let info = parse_entry(name, entry)?;
        if info.end > data_len {
            return Err(format!(
                "tensor '{name}': data_offsets [{}, {}] run past the data section ({data_len} \
                 bytes; the file is truncated or corrupt)",
                info.start, info.end
            ));
        }
        tensors.push((name.clone(), info));
    }
    tensors.sort_by_key(|(_, info)| (info.start, info.end));
    for pair in tensors.windows(2) {
        let ((a, ia), (b, ib)) = (&pair[0], &pair[1]);
        if ib.start < ia.end {
            return Err(format!(
                "tensors '{a}' [{}, {}] and '{b}' [{}, {}] overlap",
                ia.start, ia.end, ib.start, ib.end
            ));
        }
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

fn parse_metadata(entry: &Value) -> Result<Vec<(String, String)>, String> {
    let Value::Object(map) = entry else {
        return Err(format!("{METADATA_KEY} must be an object of strings"));
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format!("{METADATA_KEY}['{k}'] must be a string, got {v}")),
        })
        .collect()
}

fn parse_entry(name: &str, entry: &Value) -> Result<TensorInfo, String> {
    let Value::Object(fields) = entry else {
        return Err(format!("tensor '{name}': entry is not an object"));
    };
    let dtype_name = field(fields, name, "dtype")?
        .as_str()
        .ok_or_else(|| format!("tensor '{name}': dtype is not a string"))?;
    let dtype = Dtype::from_name(dtype_name).ok_or_else(|| {
        format!(
            "tensor '{name}': unknown dtype '{dtype_name}' (known: {})",
            Dtype::known_names()
        )
    })?;
    let shape = unsigned_list(field(fields, name, "shape")?)
        .ok_or_else(|| format!("tensor '{name}': shape must be a list of non-negative integers"))?
        .into_iter()
        .map(|d| {
            usize::try_from(d).map_err(|_| format!("tensor '{name}': dimension {d} too large"))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let offsets = unsigned_list(field(fields, name, "data_offsets")?)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| {
            format!("tensor '{name}': data_offsets must be two non-negative integers [start, end]")
        })?;
    let (start, end) = (offsets[0], offsets[1]);
    if end < start {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] end before they start"
        ));
    }
    let expected = byte_count(dtype, &shape)
        .ok_or_else(|| format!("tensor '{name}': shape {shape:?} overflows"))?;
    if end - start != expected {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] hold {} bytes, but dtype {} and shape \
             {shape:?} need {expected}",
            end - start,
            dtype.name()
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start,
        end,
    })
}

fn field<'a>(fields: &'a Map<String, Value>, name: &str, key: &str) -> Result<&'a Value, String> {
    fields
        .get(key)
        .ok_or_else(|| format!("tensor '{name}': missing '{key}'"))
}

fn unsigned_list(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

/// The JSON header for tensors laid out back to back in `entries` order, metadata first.
pub fn header_json(entries: &[(String, TensorInfo)], metadata: &[(String, String)]) -> String {
    let mut out = String::with_capacity(64 + entries.len() * 96);
    out.push('{');
    let mut first = true;
    if !metadata.is_empty() {
        let map: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        out.push_str(&json_string(METADATA_KEY));
        out.push(':');
        out.push_str(&Value::Object(map).to_string());
        first = false;
    }
    for (name, info) in entries {
        if !first {
            out.push(',');
        }
        first = false;
        let shape: Vec<String> = info.shape.iter().map(|d| d.to_string()).collect();
        out.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_string(name),
            info.dtype.name(),
            shape.join(","),
            info.start,
            info.end
        ));
    }
    out.push('}');
    out
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend(std::iter::repeat(0u8).take(data_len));
        f
    }

    #[test]
    fn round_trips_written_header() {
        let entries = vec![
            (
                "a\"b".to_string(),
                TensorInfo {
                    dtype: Dtype::F16,
                    shape: vec![2, 3],
                    start: 0,
                    end: 12,
                },
            ),
            (
                "c".to_string(),
                TensorInfo {
                    dtype: Dtype::I32,
                    shape: vec![],
                    start: 12,
                    end: 16,
                },
            ),
        ];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let json = header_json(&entries, &meta);
        let h = parse_header(&file_with(&format!("{json}   "), 16)).unwrap();
        assert_eq!(h.tensors, entries);
        assert_eq!(h.metadata, meta);
    }

    #[test]
    fn rejects_bad_headers() {
        let cases = [
            (file_with("{}", 0)[..5].to_vec(), "truncated"),
            (
                {
                    let mut f = file_with("{}", 0);
                    f[0] = 200;
                    f
                },
                "runs past",
            ),
            (file_with("{nope", 0), "not valid JSON"),
            (file_with("[]", 0), "does not start"),
            (
                file_with(
                    r#"{"t":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}"#,
                    1,
                ),
                "unknown dtype",
            ),
            (
                file_with(
                    r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    8,
                ),
                "need 8",
            ),
            (
                file_with(
                    r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
                "run past",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                    6,
                ),
                "overlap",
            ),
            (
                file_with(
                    r#"{"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                    1,
                ),
                "non-negative",
            ),
        ];
        for (bytes, expected) in cases {
            let err = parse_header(&bytes).unwrap_err();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }
}
