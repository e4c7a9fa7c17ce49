//! Build step that rides along with the Rust extension: compile the gRPC contract in `proto/` into
//! Python modules under `gateway/proto_gen/` with grpcio-tools.
//!
//! Why here: maturin is the build backend and has no Python build hook, but it always runs this
//! crate's build script, for `pip install -e .`, `pip wheel .` and `maturin develop` alike, with
//! the interpreter it builds for in `PYO3_PYTHON` (and, under pip's build isolation, the build
//! requirements, grpcio-tools among them, on that interpreter's `PYTHONPATH`).
//!
//! Layout: protoc runs with `-I proto`, so `proto/gptqgw/v1/gateway.proto` becomes
//! `gateway/proto_gen/gptqgw/v1/gateway_pb2.py` (+ `_pb2_grpc.py`, `.pyi`) and the descriptor set
//! `gateway/proto_gen/gptqgw.binpb` (imports and comments included) that the server's reflection
//! serves (with `proto/grpc_health/v1/health.proto`, the health service, in the descriptor set
//! only, so `grpcurl -protoset` finds it). `gateway/proto.py` is the one place that imports them.
//!
//! Under maturin a failure here fails the build (a wheel without its gRPC modules is broken);
//! under a plain `cargo build`/`cargo test` a missing grpcio-tools is only a warning.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const DESCRIPTOR_SET: &str = "gptqgw.binpb";
const INIT_DOCSTRING: &str = "\"\"\"Generated at build time from proto/ by native/build.rs; do not edit.\"\"\"\n";

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = crate_dir.parent().expect("native/ lives in the repository root").to_path_buf();
    let proto_root = root.join("proto");
    let dest = root.join("gateway").join("proto_gen");
    let strict = env::var_os("PYO3_PYTHON").is_some();

    println!("cargo:rerun-if-changed=build.rs");
    if !proto_root.is_dir() {
        // The crate built on its own (outside this repository): nothing to compile.
        println!("cargo:warning=no proto/ folder beside native/: gRPC modules not generated");
        return;
    }
    println!("cargo:rerun-if-changed={}", proto_root.display());

    if let Err(message) = generate(&root, &proto_root, &dest) {
        if strict {
            panic!("compiling proto/ into gateway/proto_gen failed: {message}");
        }
        println!("cargo:warning=gRPC modules not generated: {message}");
    }
}

fn generate(root: &Path, proto_root: &Path, dest: &Path) -> Result<(), String> {
    let mut protos = Vec::new();
    collect_files(proto_root, "proto", &mut protos).map_err(|e| format!("reading proto/: {e}"))?;
    protos.sort();
    if protos.is_empty() {
        return Err("proto/ holds no .proto file".into());
    }
    let python = find_python_with_grpc_tools()?;

    // Compile into OUT_DIR first, then copy what changed, so a failed protoc never leaves a
    // half-written package behind and unchanged files keep their timestamps.
    let staging = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?).join("proto_gen");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| format!("clearing {}: {e}", staging.display()))?;
    }
    fs::create_dir_all(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    let out = staging.to_str().ok_or("OUT_DIR is not UTF-8")?;
    // Python modules for our own protos only; the descriptor set for all of them (the health
    // service's copy is there for grpcurl -protoset; the server imports grpcio-health-checking's).
    let own: Vec<&String> = protos.iter().filter(|p| !is_descriptor_only(p)).collect();
    run_protoc(&python, root, &own, &[
        format!("--python_out={out}"),
        format!("--pyi_out={out}"),
        format!("--grpc_python_out={out}"),
    ])?;
    let all: Vec<&String> = protos.iter().collect();
    run_protoc(&python, root, &all, &[
        format!("--descriptor_set_out={}", staging.join(DESCRIPTOR_SET).display()),
        "--include_imports".into(),
        "--include_source_info".into(),
    ])?;
    add_package_markers(&staging).map_err(|e| format!("writing __init__.py files: {e}"))?;

    let newest_input = newest_mtime(root, &protos).map_err(|e| format!("reading proto/ timestamps: {e}"))?;
    let mut generated = Vec::new();
    collect_all_files(&staging, &mut generated).map_err(|e| e.to_string())?;
    for file in &generated {
        let relative = file.strip_prefix(&staging).expect("listed under staging");
        let target = dest.join(relative);
        copy_if_changed(file, &target, newest_input)
            .map_err(|e| format!("writing {}: {e}", target.display()))?;
        // A deleted or hand-edited output makes cargo run this script again (its timestamp is
        // set to the newest .proto's, older than any build, so an untouched one never does).
        println!("cargo:rerun-if-changed={}", target.display());
    }
    remove_stale(dest, &staging).map_err(|e| format!("pruning {}: {e}", dest.display()))?;
    Ok(())
}

/// Protos under proto/grpc_health/ (gRPC's standard services): descriptor set only.
fn is_descriptor_only(proto: &str) -> bool {
    proto.starts_with("proto/grpc_health/")
}

fn run_protoc(python: &str, root: &Path, protos: &[&String], outputs: &[String]) -> Result<(), String> {
    let status = Command::new(python)
        .current_dir(root)
        .arg("-m")
        .arg("grpc_tools.protoc")
        .arg("-Iproto")
        .args(outputs)
        .args(protos)
        .status()
        .map_err(|e| format!("running {python} -m grpc_tools.protoc: {e}"))?;
    if !status.success() {
        return Err(format!("{python} -m grpc_tools.protoc exited with {status}"));
    }
    Ok(())
}

/// The interpreter maturin builds for first, then whatever `python3` is; the first one that can
/// import grpc_tools wins.
fn find_python_with_grpc_tools() -> Result<String, String> {
    let mut candidates: Vec<String> = Vec::new();
    for var in ["PYO3_PYTHON", "PYTHON_SYS_EXECUTABLE"] {
        if let Ok(path) = env::var(var) {
            candidates.push(path);
        }
    }
    if let Ok(venv) = env::var("VIRTUAL_ENV") {
        candidates.push(format!("{venv}/bin/python"));
    }
    candidates.push("python3".into());
    candidates.push("python".into());
    for candidate in &candidates {
        let ok = Command::new(candidate)
            .args(["-c", "import grpc_tools.protoc"])
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(candidate.clone());
        }
    }
    Err(format!(
        "none of {candidates:?} can import grpc_tools (pip install grpcio-tools; it is a build requirement in pyproject.toml)"
    ))
}

/// protoc writes modules only; the folders must be packages for `gateway.proto_gen.gptqgw.v1`.
fn add_package_markers(staging: &Path) -> io::Result<()> {
    fs::write(staging.join("__init__.py"), INIT_DOCSTRING)?;
    let mut dirs = Vec::new();
    collect_dirs(staging, &mut dirs)?;
    for dir in dirs {
        fs::write(dir.join("__init__.py"), INIT_DOCSTRING)?;
    }
    Ok(())
}

fn copy_if_changed(source: &Path, target: &Path, mtime: SystemTime) -> io::Result<()> {
    let new = fs::read(source)?;
    if fs::read(target).ok().as_deref() == Some(new.as_slice()) {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(target, &new)?;
    fs::OpenOptions::new().write(true).open(target)?.set_modified(mtime)
}

/// Files under `dest` that this run did not generate (a renamed or deleted .proto's modules).
fn remove_stale(dest: &Path, staging: &Path) -> io::Result<()> {
    let mut existing = Vec::new();
    collect_all_files(dest, &mut existing)?;
    for file in existing {
        let relative = file.strip_prefix(dest).expect("listed under dest");
        let generated_kind = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("py" | "pyi" | "binpb")
        );
        if generated_kind && !staging.join(relative).exists() {
            fs::remove_file(&file)?;
        }
    }
    Ok(())
}

fn newest_mtime(root: &Path, files: &[String]) -> io::Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    for file in files {
        newest = newest.max(fs::metadata(root.join(file))?.modified()?);
    }
    Ok(newest)
}

/// `.proto` paths under `dir`, spelled relative to the repository root (protoc's working dir).
fn collect_files(dir: &Path, spelled: &str, out: &mut Vec<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, &format!("{spelled}/{name}"), out)?;
        } else if name.ends_with(".proto") {
            out.push(format!("{spelled}/{name}"));
        }
    }
    Ok(())
}

fn collect_all_files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_all_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_dirs(&path, out)?;
            out.push(path);
        }
    }
    Ok(())
}
