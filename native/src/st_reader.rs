//! Finding and validating the files of a safetensors checkpoint, free of Python: a single file,
//! or a directory with `model.safetensors` or `model.safetensors.index.json` plus shards.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut, MmapOptions};
use serde_json::Value;

use crate::st_format::{parse_header, Header, TensorInfo};

#[derive(Debug)]
pub enum OpenError {
    /// The file could not be read (missing, permissions...).
    Io { path: PathBuf, source: io::Error },
    /// The bytes are not a valid checkpoint; the message names the file.
    Format(String),
}

fn format_error(path: &Path, message: impl std::fmt::Display) -> OpenError {
    OpenError::Format(format!("{}: {message}", path.display()))
}

/// The files to open, and for an index the tensor-to-file map it declares.
pub struct Layout {
    pub files: Vec<PathBuf>,
    pub weight_map: Option<BTreeMap<String, PathBuf>>,
}

/// Resolves a user path the way Hugging Face loaders do: a directory's `model.safetensors`
/// wins over its index.
pub fn resolve(path: &Path) -> Result<Layout, OpenError> {
    let meta = fs::metadata(path).map_err(|source| OpenError::Io {
        path: path.into(),
        source,
    })?;
    if meta.is_file() {
        if path.extension().is_some_and(|e| e == "json") {
            return layout_from_index(path);
        }
        return Ok(Layout {
            files: vec![path.to_path_buf()],
            weight_map: None,
        });
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(Layout {
            files: vec![single],
            weight_map: None,
        });
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        return layout_from_index(&index);
    }
    // Another prefix: accept exactly one index, else exactly one file.
    let listed: Vec<PathBuf> = fs::read_dir(path)
        .map_err(|source| OpenError::Io {
            path: path.into(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    let named = |suffix: &str| -> Vec<PathBuf> {
        listed
            .iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(suffix) && !n.starts_with('.'))
            })
            .cloned()
            .collect()
    };
    match (
        named(".safetensors.index.json").as_slice(),
        named(".safetensors").as_slice(),
    ) {
        ([index], _) => layout_from_index(index),
        ([], [file]) => Ok(Layout {
            files: vec![file.clone()],
            weight_map: None,
        }),
        _ => Err(format_error(
            path,
            "no model.safetensors or model.safetensors.index.json here (and not exactly one \
             other .safetensors file or index)",
        )),
    }
}

fn layout_from_index(index: &Path) -> Result<Layout, OpenError> {
    let text = fs::read_to_string(index).map_err(|source| match source.kind() {
        io::ErrorKind::InvalidData => format_error(index, "index is not valid UTF-8"),
        _ => OpenError::Io {
            path: index.into(),
            source,
        },
    })?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| format_error(index, format!("index is not valid JSON: {e}")))?;
    let Some(Value::Object(map)) = json.get("weight_map") else {
        return Err(format_error(index, "index has no \"weight_map\" object"));
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut weight_map = BTreeMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let Value::String(file) = file else {
            return Err(format_error(
                index,
                format!("weight_map['{tensor}'] is not a file name"),
            ));
        };
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(format_error(
                index,
                format!("weight_map['{tensor}'] names {file:?}, not a file beside the index"),
            ));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path.clone());
        }
        weight_map.insert(tensor.clone(), path);
    }
    files.sort();
    Ok(Layout {
        files,
        weight_map: Some(weight_map),
    })
}

/// A mapping whose bytes stay put for as long as it lives.
pub enum Mapping {
    ReadOnly(Mmap),
    /// Private, copy-on-write: writes stay in this process and never reach the file.
    CopyOnWrite(MmapMut),
}

impl Mapping {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Mapping::ReadOnly(m) => m,
            Mapping::CopyOnWrite(m) => m,
        }
    }
}

pub fn map_file(path: &Path, copy_on_write: bool) -> Result<Mapping, OpenError> {
    let io_error = |source| OpenError::Io {
        path: path.into(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    if len < 8 {
        // mmap refuses empty files; say what is wrong instead.
        return Err(format_error(
            path,
            format!("truncated: {len} bytes, shorter than the 8-byte header length field"),
        ));
    }
    // SAFETY: the mapping is only read through slices while it lives. Another process
    // truncating the file meanwhile would fault (SIGBUS): documented, not preventable here.
    let mapping = unsafe {
        if copy_on_write {
            MmapOptions::new().map_copy(&file).map(Mapping::CopyOnWrite)
        } else {
            MmapOptions::new().map(&file).map(Mapping::ReadOnly)
        }
    };
    mapping.map_err(io_error)
}

pub fn read_header(path: &Path, mapping: &Mapping) -> Result<Header, OpenError> {
    parse_header(mapping.bytes()).map_err(|m| format_error(path, m))
}

/// Every tensor of the checkpoint: name -> (file position in `files`, info), after checking
/// that the index and the files agree and that no name is in two files.
pub fn tensor_table(
    files: &[PathBuf],
    headers: &[Header],
    weight_map: Option<&BTreeMap<String, PathBuf>>,
) -> Result<BTreeMap<String, (usize, TensorInfo)>, OpenError> {
    let mut table = BTreeMap::new();
    for (i, header) in headers.iter().enumerate() {
        for (name, info) in &header.tensors {
            if let Some((j, _)) = table.insert(name.clone(), (i, info.clone())) {
                return Err(format_error(
                    &files[i],
                    format!("tensor '{name}' is also in {}", files[j].display()),
                ));
            }
        }
    }
    let Some(weight_map) = weight_map else {
        return Ok(table);
    };
    for (name, path) in weight_map {
        match table.get(name) {
            Some((i, _)) if &files[*i] == path => {}
            _ => {
                return Err(format_error(
                    path,
                    format!("the index maps tensor '{name}' to this file, which does not hold it"),
                ))
            }
        }
    }
    // Like Hugging Face loaders, only what the index lists is part of the checkpoint.
    table.retain(|name, _| weight_map.contains_key(name));
    Ok(table)
}
