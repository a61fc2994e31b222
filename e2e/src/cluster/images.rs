//! Images without a registry or a container engine: a root filesystem (a few files, or a Debian made
//! by `debootstrap`) written as a one-layer OCI archive that `ctr images import` takes, under the
//! names the chart and the examples use. Archives are cached outside the repository
//! (`~/.cache/switchyard/images`), keyed by what they were made of.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::error::ClusterError;
use super::host::run;
use super::programs::Programs;

/// The Kubernetes version the cluster's programs were built at (`scripts/kube-binaries`).
pub fn kube_version() -> String {
    std::env::var("KUBE_VERSION").unwrap_or_else(|_| "v1.36.3".to_string())
}

/// The operator's image, as the chart names it by default (`image.repository:appVersion`).
pub const OPERATOR: &str = "ghcr.io/switchyard-dev/switchyard:0.1.0";
/// The chart's NATS (`nats.image`): here the `nats-server` the tests install, on nothing else.
pub const NATS: &str = "nats:2.11-alpine";
/// The examples' handler images: here one Debian bookworm with Python and Ruby, under both names.
pub const PYTHON: &str = "python:3.12-slim";
pub const RUBY: &str = "ruby:3.3-slim";
/// What the handler image is made of: `debootstrap --variant=minbase --include=…`.
pub const HANDLER_PACKAGES: &str = "python3,ruby";
pub const HANDLER_SUITE: &str = "bookworm";

/// `python:3.12-slim` → `docker.io/library/python:3.12-slim`, as containerd names images.
pub fn full_name(name: &str) -> String {
    let (first, _) = name.split_once('/').unwrap_or(("", name));
    if !name.contains('/') {
        format!("docker.io/library/{name}")
    } else if first.contains('.') || first.contains(':') || first == "localhost" {
        name.to_string()
    } else {
        format!("docker.io/{name}")
    }
}

/// The tag of a name (`ref.name` in an OCI index).
fn tag_of(name: &str) -> &str {
    let last = name.rsplit('/').next().unwrap_or(name);
    last.split_once(':').map(|(_, t)| t).unwrap_or("latest")
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/switchyard")
        })
        .join("images")
}

/// What an image runs as, and with.
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub env: Vec<String>,
}

/// An image built (or found in the cache): its archive, the names in it, and its size.
#[derive(Clone, Debug)]
pub struct Built {
    pub names: Vec<String>,
    pub archive: PathBuf,
    /// The uncompressed layer, which is what a node stores.
    pub layer_bytes: u64,
}

fn sha256_file(path: &Path) -> Result<(String, u64), ClusterError> {
    let mut file = std::fs::File::open(path).map_err(|e| ClusterError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| ClusterError::io(path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((hex(&hasher.finalize()), size))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A short key of what an image is made of (file contents and settings).
fn key_of(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex(&hasher.finalize())[..16].to_string()
}

/// Writes `rootfs` as a one-layer OCI image archive at `archive`, named `names`.
pub fn write_archive(
    rootfs: &Path,
    names: &[&str],
    config: &ImageConfig,
    archive: &Path,
) -> Result<u64, ClusterError> {
    let work = archive.with_extension("build");
    let _ = std::fs::remove_dir_all(&work);
    let blobs = work.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| ClusterError::io(&blobs, e))?;
    let layer = work.join("layer.tar");
    // Root-owned files, in a stable order and time, so that the same tree gives the same layer.
    run(Command::new("tar")
        .arg("--create")
        .arg(format!("--file={}", layer.display()))
        .arg(format!("--directory={}", rootfs.display()))
        .args([
            "--numeric-owner",
            "--sort=name",
            "--mtime=@0",
            "--xattrs",
            ".",
        ]))?;
    let (layer_digest, layer_size) = sha256_file(&layer)?;
    std::fs::rename(&layer, blobs.join(&layer_digest)).map_err(|e| ClusterError::io(&layer, e))?;
    let image_config = image_config(config, &layer_digest);
    let config_digest = sha256_bytes(image_config.as_bytes());
    let write = |path: PathBuf, text: &str| {
        std::fs::write(&path, text).map_err(|e| ClusterError::io(&path, e))
    };
    write(blobs.join(&config_digest), &image_config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": image_config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_size
        }]
    })
    .to_string();
    let manifest_digest = sha256_bytes(manifest.as_bytes());
    write(blobs.join(&manifest_digest), &manifest)?;
    let index = image_index(names, &manifest_digest, manifest.len());
    write(work.join("index.json"), &index)?;
    write(work.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let partial = archive.with_extension("partial");
    run(Command::new("tar")
        .arg("--create")
        .arg(format!("--file={}", partial.display()))
        .arg(format!("--directory={}", work.display()))
        .args(["oci-layout", "index.json", "blobs"]))?;
    std::fs::rename(&partial, archive).map_err(|e| ClusterError::io(archive, e))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(layer_size)
}

/// The image's configuration (its one layer's digest, entrypoint, command, user, environment) as
/// OCI JSON.
fn image_config(config: &ImageConfig, layer_digest: &str) -> String {
    let mut inner = serde_json::json!({"Env": config.env});
    if !config.entrypoint.is_empty() {
        inner["Entrypoint"] = serde_json::json!(config.entrypoint);
    }
    if !config.cmd.is_empty() {
        inner["Cmd"] = serde_json::json!(config.cmd);
    }
    if let Some(user) = &config.user {
        inner["User"] = serde_json::json!(user);
    }
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created_by": "switchyard e2e images (one layer)"}]
    })
    .to_string()
}

/// The archive's index: the one manifest under each of the image's names.
fn image_index(names: &[&str], manifest_digest: &str, manifest_size: usize) -> String {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": names.iter().map(|name| serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": full_name(name),
                "org.opencontainers.image.ref.name": tag_of(name)
            }
        })).collect::<Vec<_>>()
    })
    .to_string()
}

/// Copies `binary` into `rootfs` at `to`, with the shared libraries it needs (none for a static one).
fn install_binary(rootfs: &Path, binary: &Path, to: &str) -> Result<(), ClusterError> {
    let target = rootfs.join(to.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ClusterError::io(parent, e))?;
    }
    std::fs::copy(binary, &target).map_err(|e| ClusterError::io(binary, e))?;
    for library in shared_libraries(binary) {
        let inside = rootfs.join(library.strip_prefix("/").unwrap_or(&library));
        if inside.exists() {
            continue;
        }
        if let Some(parent) = inside.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ClusterError::io(parent, e))?;
        }
        std::fs::copy(&library, &inside).map_err(|e| ClusterError::io(&library, e))?;
    }
    Ok(())
}

/// The shared libraries `ldd` names for `binary` (with its loader); none when it is static.
pub fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

fn write_file(rootfs: &Path, path: &str, text: &str) -> Result<(), ClusterError> {
    let target = rootfs.join(path.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ClusterError::io(parent, e))?;
    }
    std::fs::write(&target, text).map_err(|e| ClusterError::io(&target, e))
}

/// A small root: `files` (source, path inside), a passwd of `user`, an empty /tmp.
fn tiny_image(
    key_name: &str,
    files: &[(&Path, &str)],
    user: Option<(u32, &str)>,
    names: &[&str],
    config: &ImageConfig,
) -> Result<Built, ClusterError> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for (source, inside) in files {
        parts.push(std::fs::read(source).map_err(|e| ClusterError::io(source, e))?);
        parts.push(inside.as_bytes().to_vec());
    }
    parts.push(names.join(",").into_bytes());
    parts.push(format!("{config:?}{user:?}").into_bytes());
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let key = key_of(&refs);
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| ClusterError::io(&dir, e))?;
    let archive = dir.join(format!("{key_name}-{key}.tar"));
    if let Some(built) = cached(&archive, names) {
        return Ok(built);
    }
    let rootfs = dir.join(format!("{key_name}-{key}.rootfs"));
    let _ = std::fs::remove_dir_all(&rootfs);
    for (source, inside) in files {
        install_binary(&rootfs, source, inside)?;
    }
    if let Some((uid, name)) = user {
        write_file(&rootfs, "/etc/passwd", &format!("root:x:0:0:root:/root:/sbin/nologin\n{name}:x:{uid}:{uid}:{name}:/home/{name}:/sbin/nologin\n"))?;
        write_file(
            &rootfs,
            "/etc/group",
            &format!("root:x:0:\n{name}:x:{uid}:\n"),
        )?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))
        .map_err(|e| ClusterError::io(rootfs.join("tmp"), e))?;
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.is_file() {
        let target = rootfs.join("etc/ssl/certs");
        std::fs::create_dir_all(&target).map_err(|e| ClusterError::io(&target, e))?;
        std::fs::copy(ca, target.join("ca-certificates.crt"))
            .map_err(|e| ClusterError::io(ca, e))?;
    }
    remove_older(&dir, key_name, &archive);
    let layer_bytes = write_archive(&rootfs, names, config, &archive)?;
    let _ = std::fs::remove_dir_all(&rootfs);
    Ok(Built {
        names: names.iter().map(|n| n.to_string()).collect(),
        archive,
        layer_bytes,
    })
}

fn cached(archive: &Path, names: &[&str]) -> Option<Built> {
    if !archive.is_file() {
        return None;
    }
    let out = Command::new("tar").arg("-tvf").arg(archive).output().ok()?;
    let layer_bytes = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("blobs/sha256/"))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    Some(Built {
        names: names.iter().map(|n| n.to_string()).collect(),
        archive: archive.to_path_buf(),
        layer_bytes,
    })
}

/// Archives of an image made of other inputs are stale: only the newest of each is kept.
fn remove_older(dir: &Path, key_name: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path != keep && name.starts_with(&format!("{key_name}-")) && name.ends_with(".tar") {
            let _ = std::fs::remove_file(path);
        }
    }
}

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The sandbox image: Kubernetes' pause, built by `scripts/kube-binaries`.
pub fn pause(programs: &Programs) -> Result<PathBuf, ClusterError> {
    let name = pause_image();
    tiny_image(
        "pause",
        &[(&programs.kube("pause"), "/pause")],
        None,
        &[&name],
        &ImageConfig {
            entrypoint: vec!["/pause".into()],
            user: Some("65535:65535".into()),
            env: vec![PATH_ENV.into()],
            ..ImageConfig::default()
        },
    )
    .map(|b| b.archive)
}

/// The cluster DNS: the CoreDNS `scripts/kube-binaries` built.
pub fn coredns(programs: &Programs) -> Result<PathBuf, ClusterError> {
    let name = coredns_image();
    tiny_image(
        "coredns",
        &[(&programs.kube("coredns"), "/coredns")],
        Some((65532, "nonroot")),
        &[&name],
        &ImageConfig {
            entrypoint: vec!["/coredns".into()],
            user: Some("65532:65532".into()),
            env: vec![PATH_ENV.into()],
            ..ImageConfig::default()
        },
    )
    .map(|b| b.archive)
}

/// Where the project's images come from.
#[derive(Clone, Debug)]
pub struct Build {
    /// The folder with `switchyard` and `switchyard-stage` (a release build, static with musl, as the
    /// Dockerfile builds them; a glibc build gets its libraries copied in).
    pub binaries: PathBuf,
    pub nats_server: PathBuf,
}

/// Where the image keeps the two programs; the chart's `command` and the operator's init container
/// name them (`switchyard_platform::image`).
pub use switchyard_platform::image::{OPERATOR_PROGRAM, STAGE_PROGRAM};

/// Whether `path` is an ELF program (not a wrapper script, such as pyenv's shims).
fn is_program(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|()| magic == *b"\x7fELF")
        .unwrap_or(false)
}

/// The operator's image (both programs, non-root, no shell), NATS, and the handlers' image.
pub fn project_images(build: &Build) -> Result<Vec<Built>, ClusterError> {
    for program in [
        build.binaries.join("switchyard"),
        build.binaries.join("switchyard-stage"),
        build.nats_server.clone(),
    ] {
        if !is_program(&program) {
            return Err(ClusterError::Unavailable(format!(
                "{} is not a program (missing, or a wrapper script): an image needs the binary itself",
                program.display()
            )));
        }
    }
    let operator = tiny_image(
        "operator",
        &[
            (&build.binaries.join("switchyard"), OPERATOR_PROGRAM),
            (&build.binaries.join("switchyard-stage"), STAGE_PROGRAM),
        ],
        Some((65532, "nonroot")),
        &[OPERATOR],
        &ImageConfig {
            entrypoint: vec![OPERATOR_PROGRAM.into()],
            cmd: vec!["operator".into()],
            user: Some("65532:65532".into()),
            env: vec![PATH_ENV.into()],
        },
    )?;
    let nats = tiny_image(
        "nats",
        &[(&build.nats_server, "/nats-server")],
        Some((1000, "nats")),
        &[NATS],
        &ImageConfig {
            entrypoint: vec!["/nats-server".into()],
            user: Some("1000:1000".into()),
            env: vec![PATH_ENV.into()],
            ..ImageConfig::default()
        },
    )?;
    Ok(vec![operator, nats, handlers()?])
}

/// Debian with Python and Ruby, from `debootstrap` and the mirror apt uses, under both example
/// names. Takes about a minute, once.
pub fn handlers() -> Result<Built, ClusterError> {
    let mirror = debian_mirror();
    let names = [PYTHON, RUBY];
    let key = key_of(&[
        HANDLER_SUITE.as_bytes(),
        HANDLER_PACKAGES.as_bytes(),
        mirror.as_bytes(),
        b"2",
    ]);
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| ClusterError::io(&dir, e))?;
    let archive = dir.join(format!("handlers-{key}.tar"));
    if let Some(built) = cached(&archive, &names) {
        return Ok(built);
    }
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(ClusterError::Unavailable(
            "no debootstrap (Debian package debootstrap): the handlers' image is made with it"
                .into(),
        ));
    }
    let rootfs = dir.join(format!("handlers-{key}.rootfs"));
    let _ = std::fs::remove_dir_all(&rootfs);
    // A root of a few hundred MiB: removed whether or not an image could be made of it.
    let made = make_handlers_archive(&rootfs, &mirror, &names, &archive);
    let _ = std::fs::remove_dir_all(&rootfs);
    let layer_bytes = made?;
    remove_older(&dir, "handlers", &archive);
    Ok(Built {
        names: names.iter().map(|n| n.to_string()).collect(),
        archive,
        layer_bytes,
    })
}

/// `debootstrap` into `rootfs`, trimmed, written as the handlers' archive: the layer's size.
fn make_handlers_archive(
    rootfs: &Path,
    mirror: &str,
    names: &[&str],
    archive: &Path,
) -> Result<u64, ClusterError> {
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={HANDLER_PACKAGES}"),
            HANDLER_SUITE,
        ])
        .arg(rootfs)
        .arg(mirror))?;
    // What a container does not need, and what would only make the layer bigger.
    for junk in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
    ] {
        let path = rootfs.join(junk);
        let _ = std::fs::remove_dir_all(&path);
        let _ = std::fs::create_dir_all(&path);
    }
    write_archive(
        rootfs,
        names,
        &ImageConfig {
            cmd: vec!["/bin/sh".into()],
            env: vec![PATH_ENV.into(), "LANG=C.UTF-8".into()],
            ..ImageConfig::default()
        },
        archive,
    )
}

/// The Debian mirror apt uses here for `suite` (the first source of it with `main`), or deb.debian.org.
pub fn debian_mirror() -> String {
    let mut texts = Vec::new();
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        // apt reads only these two kinds of file; anything else there is switched off.
        paths.retain(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"));
        texts.extend(
            paths
                .iter()
                .map(|p| std::fs::read_to_string(p).unwrap_or_default()),
        );
    }
    texts
        .iter()
        .find_map(|t| mirror_in(t, HANDLER_SUITE))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// The first source in an apt file (one-line `deb` entries or deb822 paragraphs) that carries
/// `suite` with its `main` component.
fn mirror_in(text: &str, suite: &str) -> Option<String> {
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let rest: Vec<&str> = words.filter(|w| !w.starts_with('[')).collect();
        if let [uri, dist, components @ ..] = rest.as_slice() {
            if *dist == suite && components.contains(&"main") {
                return Some(uri.to_string());
            }
        }
    }
    for paragraph in text.split("\n\n") {
        let field = |name: &str| {
            paragraph
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
            continue;
        };
        let components = field("Components:").unwrap_or_default();
        let types = field("Types:").unwrap_or_else(|| "deb".into());
        if types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
            && components.split_whitespace().any(|c| c == "main")
        {
            return uris.split_whitespace().next().map(str::to_string);
        }
    }
    None
}

/// Images every cluster imports at `up`: the sandbox and the cluster DNS.
pub fn pause_image() -> String {
    format!("switchyard.test/pause:{}", kube_version())
}

pub fn coredns_image() -> String {
    "switchyard.test/coredns:1".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_the_source_of_the_suite_not_any_source() {
        let nodesource = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n";
        let debian = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(mirror_in(nodesource, "bookworm"), None);
        assert_eq!(
            mirror_in(debian, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(
            mirror_in(
                "deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n",
                "bookworm"
            )
            .as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in(
                "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
                "bookworm"
            ),
            None
        );
    }

    #[test]
    fn names_are_completed_as_containerd_stores_them() {
        assert_eq!(
            full_name("python:3.12-slim"),
            "docker.io/library/python:3.12-slim"
        );
        assert_eq!(
            full_name("ghcr.io/switchyard-dev/switchyard:0.1.0"),
            "ghcr.io/switchyard-dev/switchyard:0.1.0"
        );
        assert_eq!(full_name("bitnami/nats:2"), "docker.io/bitnami/nats:2");
        assert_eq!(
            full_name("switchyard.test/pause:v1"),
            "switchyard.test/pause:v1"
        );
        assert_eq!(tag_of("ghcr.io/a/b:0.1.0"), "0.1.0");
        assert_eq!(tag_of("localhost:5000/a"), "latest");
    }

    #[test]
    fn an_archive_holds_one_layer_and_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("root");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/hello"), "hi").unwrap();
        let archive = dir.path().join("image.tar");
        write_archive(
            &rootfs,
            &["a:1", "b.example/c:2"],
            &ImageConfig::default(),
            &archive,
        )
        .unwrap();
        let listing = run(Command::new("tar").arg("-tf").arg(&archive)).unwrap();
        assert!(listing.contains("index.json") && listing.contains("oci-layout"));
        assert_eq!(
            listing
                .lines()
                .filter(|l| l.contains("blobs/sha256/") && !l.ends_with('/'))
                .count(),
            3
        );
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(&archive)
            .arg("index.json")
            .output()
            .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                m["annotations"]["io.containerd.image.name"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(names, vec!["docker.io/library/a:1", "b.example/c:2"]);
    }
}
