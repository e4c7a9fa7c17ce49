//! Streaming, sharded, atomic safetensors writer, free of Python.
//!
//! Tensor bytes go to disk as they are added; nothing of the model is kept but the header
//! entries. The header is only known when a shard closes, so each shard file starts with a
//! reserved, page-aligned header region that the closing header fills (padded with spaces,
//! which JSON allows). A header that outgrows its region (thousands of tensors in one shard) is
//! written to a new file followed by an in-kernel copy of the data, and later shards reserve
//! more; small shards are rewritten the same way, without the unused reserve. Shards live under
//! hidden temporary names until `finish` renames them into place. Each tensor's checksum is
//! taken as it is added and recorded in its shard's metadata (see `checksum`).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::checksum;
use crate::st_format::{header_json, Dtype, TensorInfo, METADATA_KEY};

const PAGE: u64 = 4096;
const MAX_INITIAL_RESERVE: u64 = 1 << 20;
const MAX_RESERVE: u64 = 64 << 20;
const WRITE_BUFFER: usize = 1 << 20;
/// The file's length runs ahead of the data in steps of this much (a sparse tail, trimmed when
/// the shard closes): on ext4, writes that keep extending the file measured markedly slower.
const GROW_STEP: u64 = 256 << 20;
/// With fsync on, writeback of every this many bytes starts as soon as they are written, so the
/// disk works while the caller produces the next tensors and the final fsync has little left.
const WRITEBACK_CHUNK: u64 = 32 << 20;
/// Shards up to this size are rewritten without their unused header reserve.
const COMPACT_BELOW: u64 = 16 << 20;
/// Where the data section of a rewritten shard starts (safetensors itself aligns to 8).
const DATA_ALIGN: u64 = 64;

/// Distinguishes temp files of writers in the same process.
static WRITER_SEQUENCE: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub enum WriteError {
    /// The caller's mistake; nothing was written for this call.
    Invalid(String),
    /// The file system failed; the writer has deleted its temporary files.
    Io {
        context: String,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    let context = context.into();
    move |source| WriteError::Io {
        context,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Open,
    Finished,
    Aborted,
}

struct OpenShard {
    tmp_path: PathBuf,
    file: BufWriter<File>,
    /// Bytes before the data section: the 8-byte length and the reserved header region.
    prefix_len: u64,
    entries: Vec<(String, TensorInfo)>,
    /// Each entry's checksum, in `entries` order.
    sums: Vec<(String, u64)>,
    data_len: u64,
    /// The file's current length, at least `prefix_len + data_len`.
    file_len: u64,
    /// File offset up to which writeback has been started.
    writeback_from: u64,
}

struct ClosedShard {
    tmp_path: PathBuf,
    entries: Vec<(String, TensorInfo)>,
}

pub struct WriterCore {
    out_dir: PathBuf,
    prefix: String,
    max_shard_bytes: u64,
    metadata: Vec<(String, String)>,
    fsync: bool,
    tmp_tag: String,
    reserve: u64,
    current: Option<OpenShard>,
    closed: Vec<ClosedShard>,
    names: HashSet<String>,
    total_size: u64,
    phase: Phase,
}

impl WriterCore {
    pub fn create(
        out_dir: &Path,
        prefix: &str,
        max_shard_bytes: u64,
        metadata: Vec<(String, String)>,
        fsync: bool,
    ) -> Result<WriterCore, WriteError> {
        if prefix.is_empty() || prefix.contains(['/', '\\']) || prefix.starts_with('.') {
            return Err(WriteError::Invalid(format!(
                "filename_prefix '{prefix}' must be a plain file name (no path separators, not \
                 hidden)"
            )));
        }
        if let Some((key, _)) = metadata.iter().find(|(k, _)| checksum::is_reserved(k)) {
            return Err(WriteError::Invalid(format!(
                "metadata key '{key}' is reserved: the writer records the checksums itself"
            )));
        }
        if max_shard_bytes == 0 {
            return Err(WriteError::Invalid(
                "max_shard_bytes must be at least 1".into(),
            ));
        }
        let meta = fs::metadata(out_dir).map_err(io_err("output directory", out_dir))?;
        if !meta.is_dir() {
            return Err(WriteError::Io {
                context: "output directory is not a directory".into(),
                path: out_dir.to_path_buf(),
                source: io::Error::from_raw_os_error(20), // ENOTDIR
            });
        }
        let sequence = WRITER_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        Ok(WriterCore {
            out_dir: out_dir.to_path_buf(),
            prefix: prefix.to_string(),
            max_shard_bytes,
            metadata,
            fsync,
            tmp_tag: format!("{}-{}", std::process::id(), sequence),
            // About 1/4096 of a shard: ~250 tensors per MB of shard before a header overflows.
            reserve: round_up(max_shard_bytes / PAGE, PAGE).clamp(PAGE, MAX_INITIAL_RESERVE),
            current: None,
            closed: Vec::new(),
            names: HashSet::new(),
            total_size: 0,
            phase: Phase::Open,
        })
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Tensor bytes added so far (the index's `total_size`).
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    fn check_open(&self) -> Result<(), WriteError> {
        match self.phase {
            Phase::Open => Ok(()),
            Phase::Finished => Err(WriteError::Invalid(format!(
                "the writer for {} is already finished",
                self.out_dir.display()
            ))),
            Phase::Aborted => Err(WriteError::Invalid(format!(
                "the writer for {} was aborted (after abort() or a write error); start a new one",
                self.out_dir.display()
            ))),
        }
    }

    /// Validates a tensor name before any byte is touched.
    pub fn check_name(&self, name: &str) -> Result<(), WriteError> {
        self.check_open()?;
        if name.is_empty() || name == METADATA_KEY {
            return Err(WriteError::Invalid(format!("invalid tensor name '{name}'")));
        }
        if self.names.contains(name) {
            return Err(WriteError::Invalid(format!(
                "tensor name '{name}' was already added"
            )));
        }
        Ok(())
    }

    /// Appends one tensor. `data` is its bytes in C order.
    pub fn add(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        data: &[u8],
    ) -> Result<(), WriteError> {
        self.check_name(name)?;
        let n = data.len() as u64;
        let expected = crate::st_format::byte_count(dtype, shape);
        if expected != Some(n) {
            return Err(WriteError::Invalid(format!(
                "tensor '{name}': {n} bytes do not match dtype {} and shape {shape:?}",
                dtype.name()
            )));
        }
        let result = self.append(name, dtype, shape, data);
        if result.is_err() {
            self.abort();
        }
        result
    }

    fn append(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        data: &[u8],
    ) -> Result<(), WriteError> {
        let n = data.len() as u64;
        let full = matches!(&self.current,
            Some(cur) if !cur.entries.is_empty() && cur.data_len + n > self.max_shard_bytes);
        if full {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.open_shard()?;
        }
        // Taken from the caller's bytes, so whatever reaches the disk is covered.
        let sum = checksum::digest(data);
        let cur = self.current.as_mut().expect("opened above");
        let end = cur.prefix_len + cur.data_len + n;
        if end > cur.file_len {
            let new_len = end.max(cur.file_len + GROW_STEP);
            // Only an optimization: where it is refused (a file size limit), stop trying and
            // let the write itself succeed or report the real error.
            cur.file_len = match cur.file.get_ref().set_len(new_len) {
                Ok(()) => new_len,
                Err(_) => u64::MAX,
            };
        }
        cur.file
            .write_all(data)
            .map_err(io_err(format!("writing tensor '{name}'"), &cur.tmp_path))?;
        let start = cur.data_len;
        cur.data_len += n;
        cur.entries.push((
            name.to_string(),
            TensorInfo {
                dtype,
                shape: shape.to_vec(),
                start,
                end: start + n,
            },
        ));
        cur.sums.push((name.to_string(), sum));
        let written = cur.prefix_len + cur.data_len;
        if self.fsync && written - cur.writeback_from >= WRITEBACK_CHUNK {
            cur.file
                .flush()
                .map_err(io_err("flushing", &cur.tmp_path))?;
            start_writeback(cur.file.get_ref(), cur.writeback_from, written);
            cur.writeback_from = written;
        }
        self.names.insert(name.to_string());
        self.total_size += n;
        Ok(())
    }

    fn open_shard(&mut self) -> Result<(), WriteError> {
        let tmp_path = self.tmp_path(&format!("shard{}", self.closed.len() + 1));
        let mut file = create_new(&tmp_path)?;
        // The header region stays a hole until the shard closes.
        file.seek(SeekFrom::Start(self.reserve))
            .map_err(io_err("reserving the header", &tmp_path))?;
        self.current = Some(OpenShard {
            tmp_path,
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            prefix_len: self.reserve,
            entries: Vec::new(),
            sums: Vec::new(),
            data_len: 0,
            file_len: 0,
            writeback_from: self.reserve,
        });
        Ok(())
    }

    fn close_current(&mut self) -> Result<(), WriteError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let OpenShard {
            mut tmp_path,
            file,
            prefix_len,
            entries,
            sums,
            data_len,
            ..
        } = cur;
        // Keep the path registered for clean-up while this shard is being closed.
        self.closed.push(ClosedShard {
            tmp_path: tmp_path.clone(),
            entries: Vec::new(),
        });
        let mut file = file
            .into_inner()
            .map_err(|e| io_err("flushing", &tmp_path)(e.into_error()))?;
        file.set_len(prefix_len + data_len)
            .map_err(io_err("trimming the shard", &tmp_path))?;
        let mut metadata = self.metadata.clone();
        metadata.extend(checksum::metadata_entries(&sums));
        let json = header_json(&entries, &metadata);
        let needed = 8 + json.len() as u64;
        let overflows = needed > prefix_len;
        // A small shard is cheap to copy, so it loses its mostly empty reserved region.
        let compact = data_len <= COMPACT_BELOW && round_up(needed, PAGE) < prefix_len;
        if !overflows && !compact {
            write_header(&mut file, &json, prefix_len, &tmp_path)?;
        } else {
            let new_prefix = round_up(needed, DATA_ALIGN);
            let new_path = self.tmp_path(&format!("shard{}-rewritten", self.closed.len()));
            let mut rewritten = create_new(&new_path)?;
            self.closed.last_mut().expect("pushed above").tmp_path = new_path.clone();
            // Unlinked now, read through the open handle below: no clean-up left on error.
            let _ = fs::remove_file(&tmp_path);
            write_header(&mut rewritten, &json, new_prefix, &new_path)?;
            file.seek(SeekFrom::Start(prefix_len))
                .map_err(io_err("reading back shard data", &tmp_path))?;
            // File to file: std uses copy_file_range, so the bytes stay in the kernel.
            let copied = io::copy(&mut (&file).take(data_len), &mut rewritten).map_err(io_err(
                "copying shard data behind the new header",
                &new_path,
            ))?;
            if copied != data_len {
                return Err(io_err("copying shard data", &new_path)(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short copy",
                )));
            }
            drop(file);
            file = rewritten;
            tmp_path = new_path;
            if overflows {
                self.reserve = round_up(needed * 2, PAGE)
                    .min(MAX_RESERVE)
                    .max(self.reserve);
            }
        }
        if self.fsync {
            file.sync_all().map_err(io_err("syncing", &tmp_path))?;
        }
        let last = self.closed.last_mut().expect("pushed above");
        last.tmp_path = tmp_path;
        last.entries = entries;
        Ok(())
    }

    /// Closes the last shard and renames every file into place; returns the final file names
    /// (shards in order, then the index when there is more than one shard).
    pub fn finish(&mut self) -> Result<Vec<String>, WriteError> {
        self.check_open()?;
        let result = self.finish_inner();
        if result.is_err() {
            self.abort();
        } else {
            self.phase = Phase::Finished;
        }
        result
    }

    fn finish_inner(&mut self) -> Result<Vec<String>, WriteError> {
        if self.current.is_none() && self.closed.is_empty() {
            self.open_shard()?; // no tensors: still a valid, empty file
        }
        self.close_current()?;
        let count = self.closed.len();
        let final_names: Vec<String> = if count == 1 {
            vec![format!("{}.safetensors", self.prefix)]
        } else {
            (1..=count)
                .map(|i| format!("{}-{i:05}-of-{count:05}.safetensors", self.prefix))
                .collect()
        };
        let index_name = format!("{}.safetensors.index.json", self.prefix);
        let mut placed: Vec<PathBuf> = Vec::new();
        if let Err(e) = self.place_files(&final_names, &index_name, &mut placed) {
            for path in &placed {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        let mut names = final_names;
        if count > 1 {
            names.push(index_name);
        }
        Ok(names)
    }

    fn place_files(
        &mut self,
        final_names: &[String],
        index_name: &str,
        placed: &mut Vec<PathBuf>,
    ) -> Result<(), WriteError> {
        let index_path = self.out_dir.join(index_name);
        if final_names.len() > 1 {
            let mut weight_map = BTreeMap::new();
            for (shard, file_name) in self.closed.iter().zip(final_names) {
                for (name, _) in &shard.entries {
                    weight_map.insert(name.clone(), Value::String(file_name.clone()));
                }
            }
            let index = json!({
                "metadata": {"total_size": self.total_size},
                "weight_map": Value::Object(weight_map.into_iter().collect::<Map<_, _>>()),
            });
            let text = serde_json::to_string_pretty(&index).expect("JSON values serialize");
            let tmp = self.tmp_path("index");
            // Registered as a closed "shard" without entries so abort() removes it too.
            self.closed.push(ClosedShard {
                tmp_path: tmp.clone(),
                entries: Vec::new(),
            });
            let mut file = create_new(&tmp)?;
            file.write_all(text.as_bytes())
                .map_err(io_err("writing the index", &tmp))?;
            if self.fsync {
                file.sync_all().map_err(io_err("syncing the index", &tmp))?;
            }
        }
        for (shard, file_name) in self.closed.iter().zip(final_names) {
            let target = self.out_dir.join(file_name);
            fs::rename(&shard.tmp_path, &target).map_err(io_err(
                format!("renaming into {file_name}"),
                &shard.tmp_path,
            ))?;
            placed.push(target);
        }
        // A file of the other layout left by an earlier run would shadow this checkpoint
        // (loaders prefer `model.safetensors` over an index), so it goes.
        let stale = if final_names.len() > 1 {
            let tmp = &self.closed.last().expect("index registered above").tmp_path;
            fs::rename(tmp, &index_path).map_err(io_err("renaming the index into place", tmp))?;
            placed.push(index_path);
            self.out_dir.join(format!("{}.safetensors", self.prefix))
        } else {
            index_path
        };
        match fs::remove_file(&stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(
                    "removing a stale file of an earlier checkpoint",
                    &stale,
                )(e))
            }
            _ => {}
        }
        if self.fsync {
            // Make the renames themselves durable.
            File::open(&self.out_dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("syncing the output directory", &self.out_dir))?;
        }
        self.closed.clear();
        Ok(())
    }

    /// Deletes every temporary file. Idempotent; a no-op after a successful finish.
    pub fn abort(&mut self) {
        if self.phase == Phase::Finished {
            return;
        }
        if let Some(cur) = self.current.take() {
            drop(cur.file.into_parts());
            let _ = fs::remove_file(&cur.tmp_path);
        }
        for shard in self.closed.drain(..) {
            let _ = fs::remove_file(&shard.tmp_path);
        }
        self.phase = Phase::Aborted;
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        self.out_dir
            .join(format!(".{}.{}.{what}.tmp", self.prefix, self.tmp_tag))
    }
}

impl Drop for WriterCore {
    fn drop(&mut self) {
        // Dropped without finish (garbage-collected, interpreter exit): leave nothing behind.
        self.abort();
    }
}

/// Asks the kernel to start writing `[from, to)` to disk now, without waiting for it.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor. Advisory: on failure the final fsync
    // simply does all the work.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _from: u64, _to: u64) {}

fn create_new(path: &Path) -> Result<File, WriteError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating a temporary file", path))
}

/// Writes the length field and the JSON padded with spaces to exactly `prefix_len` bytes.
fn write_header(
    file: &mut File,
    json: &str,
    prefix_len: u64,
    path: &Path,
) -> Result<(), WriteError> {
    let header_len = prefix_len - 8;
    let mut bytes = Vec::with_capacity(prefix_len as usize);
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(prefix_len as usize, b' ');
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&bytes))
        .and_then(|_| file.seek(SeekFrom::End(0)).map(|_| ()))
        .map_err(io_err("writing the header", path))
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::st_format::parse_header;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("st_writer_test_{tag}_{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn header_overflow_relocates_and_stays_valid() {
        let dir = temp_dir("grow");
        let mut w = WriterCore::create(&dir, "model", 1 << 40, vec![], false).unwrap();
        w.reserve = PAGE; // force the rewrite path: 200 entries need more than 4 KiB
        for i in 0..200 {
            let data = [i as u8; 3];
            w.add(&format!("t{i:04}"), Dtype::U8, &[3], &data).unwrap();
        }
        let names = w.finish().unwrap();
        assert_eq!(names, vec!["model.safetensors"]);
        let bytes = fs::read(dir.join("model.safetensors")).unwrap();
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.tensors.len(), 200);
        let (_, last) = &h.tensors[199];
        let at = (h.data_start + last.start) as usize;
        assert_eq!(&bytes[at..at + 3], &[199u8; 3]);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_without_finish_leaves_nothing() {
        let dir = temp_dir("drop");
        {
            let mut w = WriterCore::create(&dir, "model", 10, vec![], false).unwrap();
            w.add("a", Dtype::U8, &[8], &[1; 8]).unwrap();
            w.add("b", Dtype::U8, &[8], &[2; 8]).unwrap();
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
