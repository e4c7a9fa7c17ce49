//! Per-tensor checksums, free of Python: the writer records one per tensor in each shard's
//! `__metadata__`, the reader verifies them in parallel.
//!
//! Layout in the metadata (a string -> string map, so the sums are JSON inside a string):
//! `"gptqgw.checksum_algorithm": "xxh3_64"` and `"gptqgw.checksums": "{\"name\":\"<16 hex>\"}"`,
//! covering exactly the tensors of that file. xxh3 because it hashes at memory speed (a 7B
//! checkpoint in well under a second on a few cores); it guards against damage, not tampering.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_64;

pub const ALGORITHM_KEY: &str = "gptqgw.checksum_algorithm";
pub const SUMS_KEY: &str = "gptqgw.checksums";
pub const ALGORITHM: &str = "xxh3_64";

/// The checksum of one tensor's bytes.
pub fn digest(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// True for metadata keys the writer owns (a caller may not set them).
pub fn is_reserved(key: &str) -> bool {
    key == ALGORITHM_KEY || key == SUMS_KEY
}

/// The two metadata entries recording `sums` (name, checksum).
pub fn metadata_entries(sums: &[(String, u64)]) -> [(String, String); 2] {
    let map: Map<String, Value> = sums
        .iter()
        .map(|(name, sum)| (name.clone(), Value::String(format!("{sum:016x}"))))
        .collect();
    [
        (ALGORITHM_KEY.to_string(), ALGORITHM.to_string()),
        (SUMS_KEY.to_string(), Value::Object(map).to_string()),
    ]
}

/// The recorded checksums of one file: None when it records none (another tool wrote it).
/// Errors are messages without the file name (the caller adds it).
pub fn parse(metadata: &[(String, String)]) -> Result<Option<BTreeMap<String, u64>>, String> {
    let lookup = |key: &str| metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let (algorithm, sums) = match (lookup(ALGORITHM_KEY), lookup(SUMS_KEY)) {
        (None, None) => return Ok(None),
        (Some(a), Some(s)) => (a, s),
        _ => {
            return Err(format!(
                "metadata has only one of '{ALGORITHM_KEY}' and '{SUMS_KEY}'"
            ))
        }
    };
    if algorithm != ALGORITHM {
        return Err(format!(
            "metadata '{ALGORITHM_KEY}' is '{algorithm}'; this build verifies only '{ALGORITHM}'"
        ));
    }
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(sums) else {
        return Err(format!("metadata '{SUMS_KEY}' is not a JSON object"));
    };
    let mut out = BTreeMap::new();
    for (name, value) in map {
        let parsed = match &value {
            Value::String(hex) if hex.len() == 16 => u64::from_str_radix(hex, 16).ok(),
            _ => None,
        };
        let Some(sum) = parsed else {
            return Err(format!(
                "metadata '{SUMS_KEY}' has {value} for tensor '{name}', not 16 hex digits"
            ));
        };
        out.insert(name, sum);
    }
    Ok(Some(out))
}

/// One tensor to check: its name, bytes and recorded checksum.
pub struct Job<'a> {
    pub name: &'a str,
    pub file: usize,
    pub data: &'a [u8],
    pub expected: u64,
}

/// A tensor whose bytes no longer match.
#[derive(Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub file: usize,
    pub expected: u64,
    pub actual: u64,
}

/// Hashes every job on rayon's pool, biggest first (so one large tensor does not finish last);
/// returns the mismatches sorted by name.
pub fn verify(mut jobs: Vec<Job<'_>>) -> Vec<Mismatch> {
    jobs.sort_by_key(|job| std::cmp::Reverse(job.data.len()));
    let mut bad: Vec<Mismatch> = jobs
        .par_iter()
        .with_max_len(1)
        .filter_map(|job| {
            let actual = digest(job.data);
            (actual != job.expected).then(|| Mismatch {
                name: job.name.to_string(),
                file: job.file,
                expected: job.expected,
                actual,
            })
        })
        .collect();
    bad.sort_by(|a, b| a.name.cmp(&b.name));
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let sums = vec![("a".to_string(), 1u64), ("b.c".to_string(), u64::MAX)];
        let meta = metadata_entries(&sums).to_vec();
        let parsed = parse(&meta).unwrap().unwrap();
        assert_eq!(parsed.get("a"), Some(&1));
        assert_eq!(parsed.get("b.c"), Some(&u64::MAX));
        assert_eq!(parse(&[]).unwrap(), None);
    }

    #[test]
    fn bad_metadata_is_refused() {
        let only_sums = vec![(SUMS_KEY.to_string(), "{}".to_string())];
        assert!(parse(&only_sums).is_err());
        let other = vec![
            (ALGORITHM_KEY.to_string(), "md5".to_string()),
            (SUMS_KEY.to_string(), "{}".to_string()),
        ];
        assert!(parse(&other).unwrap_err().contains("md5"));
        let short = vec![
            (ALGORITHM_KEY.to_string(), ALGORITHM.to_string()),
            (SUMS_KEY.to_string(), r#"{"t":"12"}"#.to_string()),
        ];
        assert!(parse(&short).unwrap_err().contains("'t'"));
    }

    #[test]
    fn verify_names_the_damaged_tensor() {
        let good = vec![7u8; 1000];
        let mut bad = good.clone();
        bad[500] = 0;
        let jobs = vec![
            Job {
                name: "ok",
                file: 0,
                data: &good,
                expected: digest(&good),
            },
            Job {
                name: "hurt",
                file: 1,
                data: &bad,
                expected: digest(&good),
            },
        ];
        let result = verify(jobs);
        assert_eq!(result.len(), 1);
        assert_eq!(result[0].name, "hurt");
        assert_eq!(result[0].file, 1);
    }
}
