//! The Kubernetes manifests in `deploy/kubernetes/` (docs/kubernetes.md), checked without a
//! cluster:
//! - every built-in object validates, strictly (no unknown field), against the Kubernetes
//!   API schemas, with `kubernetes-validate` (installed by scripts/setup);
//! - every custom object (snapshot classes, SnapshotMetadataService, cert-manager's) has
//!   the fields its CRD requires and no field it does not know, by the small schemas below,
//!   written from the CRDs the projects publish;
//! - the manifests agree with the driver: the sockets the sidecars dial are the one the
//!   driver serves, in a volume both mount; every `snapblk` flag exists in the binary's
//!   `--help`; the driver name is the binary's default everywhere it appears, and the
//!   topology key the code derives from it is the one the documentation names; the ports,
//!   Services, Secrets and files that flags point at exist;
//! - the sidecars' flags exist in the sidecar versions the images pin;
//! - and each check fails on a manifest broken on purpose.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Manifests that `kustomization.yaml` leaves out on purpose (applied on their own).
const NOT_IN_KUSTOMIZATION: &[&str] = &["snapshotmetadataservice.yaml"];

#[derive(Clone, Debug)]
struct Doc {
    file: PathBuf,
    v: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.v["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.v["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.v["metadata"]["namespace"].as_str().unwrap_or("")
    }
    fn what(&self) -> String {
        format!(
            "{}: {} {}",
            self.file.strip_prefix(DIR).unwrap_or(&self.file).display(),
            self.kind(),
            self.name()
        )
    }
}

/// Every `.yaml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn is_kustomization(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "kustomization.yaml")
}

/// Every object in a YAML stream (documents holding only comments are skipped).
fn parse(file: &Path, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = vec![];
    for d in serde_norway::Deserializer::from_str(text) {
        let v = Value::deserialize(d).map_err(|e| format!("{}: {e}", file.display()))?;
        if !v.is_null() {
            docs.push(Doc {
                file: file.to_path_buf(),
                v,
            });
        }
    }
    Ok(docs)
}

/// The objects of every manifest (kustomization files excluded).
fn load() -> Vec<Doc> {
    let mut docs = vec![];
    for f in yaml_files(Path::new(DIR)) {
        if is_kustomization(&f) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        docs.extend(parse(&f, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(docs.len() > 10, "deploy/kubernetes holds too few objects");
    docs
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Doc> {
    docs.iter().find(|d| d.kind() == kind && d.name() == name)
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// kubernetes-validate

/// The `kubernetes-validate` to run: $KUBERNETES_VALIDATE, the one scripts/setup installs
/// in its virtual environment, or the one in PATH.
fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(c) = cache {
        let p = c.join("snapblk/python/bin/kubernetes-validate");
        if p.exists() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("kubernetes-validate");
            if p.exists() {
                return p;
            }
        }
    }
    panic!("kubernetes-validate not found: run scripts/setup (it installs it with pip)")
}

/// Custom kinds, which kubernetes-validate has no schema for (checked by `crd_problems`).
const CUSTOM_KINDS: &[&str] = &[
    "VolumeSnapshotClass",
    "VolumeGroupSnapshotClass",
    "SnapshotMetadataService",
    "Issuer",
    "Certificate",
];

/// Runs kubernetes-validate --strict on files; the problems it reports. A kind it has no
/// schema for is a problem unless it is one of ours (a misspelt kind would pass otherwise).
fn validate_problems(files: &[PathBuf]) -> Vec<String> {
    let out = Command::new(kubernetes_validate())
        .arg("--strict")
        .arg("--quiet")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut problems = vec![];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.split("Couldn't find schema for kind ").nth(1) {
            let kind = rest.split_whitespace().next().unwrap_or("");
            if CUSTOM_KINDS.contains(&kind) {
                continue;
            }
        }
        problems.push(line.to_string());
    }
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate failed: {}", out.status));
    }
    problems
}

// ---------------------------------------------------------------------------------------
// Custom resources: small schemas written from the published CRDs
//   snapshot.storage.k8s.io, groupsnapshot.storage.k8s.io: external-snapshotter v8.6.0,
//     client/config/crd/*.yaml
//   cbt.storage.k8s.io: external-snapshot-metadata v1.1.0,
//     client/config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml
//   cert-manager.io: cert-manager deploy/crds/cert-manager.io_{issuers,certificates}.yaml

#[derive(Clone, Copy)]
enum T {
    Str,
    /// A string holding base64 (OpenAPI `format: byte`).
    Bytes,
    Bool,
    Int,
    Enum(&'static [&'static str]),
    StrMap,
    StrList,
    EnumList(&'static [&'static str]),
    Obj(&'static [F]),
}

/// A field: name, required, type.
struct F(&'static str, bool, T);

struct Crd {
    kind: &'static str,
    api_versions: &'static [&'static str],
    namespaced: bool,
    fields: &'static [F],
}

const DELETION: &[&str] = &["Delete", "Retain"];
const SNAPSHOT_CLASS: &[F] = &[
    F("driver", true, T::Str),
    F("deletionPolicy", true, T::Enum(DELETION)),
    F("parameters", false, T::StrMap),
];
const CRL: F = F("crlDistributionPoints", false, T::StrList);
const ISSUER_SPEC: &[F] = &[
    F("selfSigned", false, T::Obj(&[CRL])),
    F(
        "ca",
        false,
        T::Obj(&[
            F("secretName", true, T::Str),
            CRL,
            F("issuingCertificateURLs", false, T::StrList),
            F("ocspServers", false, T::StrList),
        ]),
    ),
];
const USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];
const CERTIFICATE_SPEC: &[F] = &[
    F("secretName", true, T::Str),
    F(
        "issuerRef",
        true,
        T::Obj(&[
            F("name", true, T::Str),
            F("kind", false, T::Str),
            F("group", false, T::Str),
        ]),
    ),
    F("commonName", false, T::Str),
    F("dnsNames", false, T::StrList),
    F("ipAddresses", false, T::StrList),
    F("duration", false, T::Str),
    F("renewBefore", false, T::Str),
    F("isCA", false, T::Bool),
    F("usages", false, T::EnumList(USAGES)),
    F(
        "privateKey",
        false,
        T::Obj(&[
            F("algorithm", false, T::Enum(&["RSA", "ECDSA", "Ed25519"])),
            F("size", false, T::Int),
            F("encoding", false, T::Enum(&["PKCS1", "PKCS8"])),
            F("rotationPolicy", false, T::Enum(&["Never", "Always"])),
        ]),
    ),
];

const CRDS: &[Crd] = &[
    Crd {
        kind: "VolumeSnapshotClass",
        api_versions: &["snapshot.storage.k8s.io/v1"],
        namespaced: false,
        fields: SNAPSHOT_CLASS,
    },
    Crd {
        kind: "VolumeGroupSnapshotClass",
        // v1 is served from external-snapshotter v8.6.0 on; v1beta2 before.
        api_versions: &["groupsnapshot.storage.k8s.io/v1"],
        namespaced: false,
        fields: SNAPSHOT_CLASS,
    },
    Crd {
        kind: "SnapshotMetadataService",
        api_versions: &["cbt.storage.k8s.io/v1beta1"],
        namespaced: false,
        fields: &[F(
            "spec",
            true,
            T::Obj(&[
                F("address", true, T::Str),
                F("audience", true, T::Str),
                F("caCert", true, T::Bytes),
            ]),
        )],
    },
    Crd {
        kind: "Issuer",
        api_versions: &["cert-manager.io/v1"],
        namespaced: true,
        fields: &[F("spec", true, T::Obj(ISSUER_SPEC))],
    },
    Crd {
        kind: "Certificate",
        api_versions: &["cert-manager.io/v1"],
        namespaced: true,
        fields: &[F("spec", true, T::Obj(CERTIFICATE_SPEC))],
    },
];

fn is_base64(x: &str) -> bool {
    let b = x.as_bytes();
    let body = b.iter().take_while(|&&c| c != b'=').count();
    !b.is_empty()
        && b.len().is_multiple_of(4)
        && b.len() - body <= 2
        && b[body..].iter().all(|&c| c == b'=')
        && b[..body]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

fn check_fields(at: &str, v: &Value, fields: &[F], out: &mut Vec<String>) {
    let Some(map) = v.as_object() else {
        out.push(format!("{at}: not an object"));
        return;
    };
    for key in map.keys() {
        if !fields.iter().any(|f| f.0 == key) {
            out.push(format!("{at}.{key}: no such field in the CRD"));
        }
    }
    for F(name, required, t) in fields {
        let path = format!("{at}.{name}");
        let Some(x) = map.get(*name) else {
            if *required {
                out.push(format!("{path}: required by the CRD, missing"));
            }
            continue;
        };
        check_type(&path, x, t, out);
    }
}

fn check_type(path: &str, x: &Value, t: &T, out: &mut Vec<String>) {
    match t {
        T::Str => {
            if !x.is_string() {
                out.push(format!("{path}: not a string"));
            }
        }
        T::Bytes => {
            if !x.as_str().is_some_and(is_base64) {
                out.push(format!("{path}: not base64"));
            }
        }
        T::Bool => {
            if !x.is_boolean() {
                out.push(format!("{path}: not a boolean"));
            }
        }
        T::Int => {
            if !x.is_i64() {
                out.push(format!("{path}: not an integer"));
            }
        }
        T::Enum(allowed) => {
            if !x.as_str().is_some_and(|s| allowed.contains(&s)) {
                out.push(format!("{path}: {x} is not one of {allowed:?}"));
            }
        }
        T::StrMap => match x.as_object() {
            Some(m) => {
                for (k, v) in m {
                    if !v.is_string() {
                        out.push(format!("{path}.{k}: not a string (quote it)"));
                    }
                }
            }
            None => out.push(format!("{path}: not a map of strings")),
        },
        T::StrList | T::EnumList(_) => match x.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let ok = match t {
                        T::EnumList(allowed) => item.as_str().is_some_and(|s| allowed.contains(&s)),
                        _ => item.is_string(),
                    };
                    if !ok {
                        out.push(format!("{path}[{i}]: {item} not allowed"));
                    }
                }
            }
            None => out.push(format!("{path}: not a list")),
        },
        T::Obj(fields) => check_fields(path, x, fields, out),
    }
}

/// What is wrong with the custom objects among docs, by the CRD schemas above.
fn crd_problems(docs: &[Doc]) -> Vec<String> {
    let mut out = vec![];
    for d in docs {
        let Some(crd) = CRDS.iter().find(|c| c.kind == d.kind()) else {
            continue;
        };
        let at = d.what();
        let av = s(&d.v["apiVersion"]);
        if !crd.api_versions.contains(&av) {
            out.push(format!(
                "{at}: apiVersion {av:?}, expected one of {:?}",
                crd.api_versions
            ));
        }
        if d.name().is_empty() {
            out.push(format!("{at}: metadata.name missing"));
        }
        if crd.namespaced == d.namespace().is_empty() {
            out.push(format!(
                "{at}: the kind is {}namespaced",
                if crd.namespaced { "" } else { "not " }
            ));
        }
        let mut rest = d.v.clone();
        if let Some(m) = rest.as_object_mut() {
            for k in ["apiVersion", "kind", "metadata"] {
                m.remove(k);
            }
        }
        check_fields(&at, &rest, crd.fields, &mut out);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Pods: containers, flags, sockets, ports, Secrets

/// The workloads (Deployments and DaemonSets) and their pod specs.
fn workloads(docs: &[Doc]) -> Vec<(&Doc, &Value)> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet" | "StatefulSet"))
        .map(|d| (d, &d.v["spec"]["template"]["spec"]))
        .collect()
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    arr(&pod["initContainers"])
        .iter()
        .chain(arr(&pod["containers"]))
}

/// A container's `--flag=value` arguments (a bare `--flag` has an empty value).
fn flags(c: &Value) -> Vec<(String, String)> {
    arr(&c["args"])
        .iter()
        .filter_map(|a| a.as_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (a.to_string(), String::new()),
        })
        .collect()
}

fn flag(c: &Value, name: &str) -> Option<String> {
    flags(c)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The image's repository name and tag: `registry.k8s.io/sig-storage/csi-resizer:v2.2.1`
/// gives ("csi-resizer", "v2.2.1").
fn image(c: &Value) -> (String, String) {
    let img = s(&c["image"]);
    let (repo, tag) = img.rsplit_once(':').unwrap_or((img, ""));
    let name = repo.rsplit('/').next().unwrap_or(repo);
    (name.to_string(), tag.to_string())
}

/// The snapblk container's role (`controller`, `node`, `all-in-one`), if it runs `csi`.
fn snapblk_role(c: &Value) -> Option<String> {
    let args: Vec<&str> = arr(&c["args"]).iter().filter_map(|a| a.as_str()).collect();
    (image(c).0 == "snapblk" && c["command"].is_null() && args.first() == Some(&"csi"))
        .then(|| args.get(1).map(|r| r.to_string()))
        .flatten()
}

/// The volume mounted in container `c` at the folder holding `path` (the longest mount
/// point that is a prefix of it), and the path inside that volume.
fn mount_of<'a>(c: &'a Value, path: &str) -> Option<(&'a str, String)> {
    arr(&c["volumeMounts"])
        .iter()
        .filter_map(|m| Some((s(&m["name"]), m["mountPath"].as_str()?)))
        .filter(|(_, mp)| {
            let mp = mp.trim_end_matches('/');
            path == mp || path.starts_with(&format!("{mp}/"))
        })
        .max_by_key(|(_, mp)| mp.len())
        .map(|(n, mp)| (n, path[mp.trim_end_matches('/').len()..].to_string()))
}

fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    arr(&pod["volumes"]).iter().find(|v| s(&v["name"]) == name)
}

/// Where a volume comes from, so that mounts of one file in two pods can be compared
/// (an emptyDir is named by its pod).
fn volume_source(pod_name: &str, pod: &Value, name: &str) -> String {
    match volume(pod, name) {
        Some(v) if v["hostPath"].is_object() => format!("hostPath:{}", s(&v["hostPath"]["path"])),
        Some(v) if v["secret"].is_object() => format!("secret:{}", s(&v["secret"]["secretName"])),
        Some(v) if v["emptyDir"].is_object() => format!("emptyDir:{pod_name}/{name}"),
        Some(v) => format!("other:{v}"),
        None => format!("missing volume {name:?}"),
    }
}

fn unix_path(endpoint: &str) -> Option<&str> {
    endpoint.strip_prefix("unix://")
}

/// The sockets: every container that dials a CSI socket (`--csi-address`) dials the one
/// its pod's snapblk container serves (`--endpoint`), through the same volume; the
/// kubelet's registration path is that socket's host path; the registrar's folder is the
/// kubelet's plugin registry.
fn socket_problems(docs: &[Doc], driver: &str) -> Vec<String> {
    let mut out = vec![];
    for (d, pod) in workloads(docs) {
        let at = d.what();
        let Some(server) = containers(pod).find(|c| snapblk_role(c).is_some()) else {
            continue;
        };
        let endpoint = flag(server, "endpoint").unwrap_or_default();
        let Some(sock) = unix_path(&endpoint) else {
            out.push(format!(
                "{at}: snapblk --endpoint {endpoint:?} is not unix://PATH"
            ));
            continue;
        };
        let Some((vol, inside)) = mount_of(server, sock) else {
            out.push(format!(
                "{at}: the snapblk container mounts no volume at its socket {sock}"
            ));
            continue;
        };
        let served = volume_source(d.name(), pod, vol);
        let mut dialers = 0;
        for c in containers(pod) {
            let Some(addr) = flag(c, "csi-address") else {
                continue;
            };
            dialers += 1;
            let name = s(&c["name"]);
            let addr = unix_path(&addr).unwrap_or(&addr);
            if addr != sock {
                out.push(format!(
                    "{at}: container {name} dials {addr}, the driver serves {sock}"
                ));
            }
            match mount_of(c, addr) {
                Some((v, i)) if volume_source(d.name(), pod, v) == served && i == inside => {}
                _ => out.push(format!(
                    "{at}: container {name} does not mount the driver's socket folder ({served}) at {addr}"
                )),
            }
            if let Some(reg) = flag(c, "kubelet-registration-path") {
                let want = format!("hostPath:/var/lib/kubelet/plugins/{driver}");
                if served != want {
                    out.push(format!(
                        "{at}: the node plugin's socket folder is {served}, the kubelet expects {want}"
                    ));
                }
                let host = format!(
                    "{}{inside}",
                    served.strip_prefix("hostPath:").unwrap_or(&served)
                );
                if reg != host {
                    out.push(format!(
                        "{at}: --kubelet-registration-path={reg}, but the socket is {host} on the host"
                    ));
                }
                let dir = flag(c, "plugin-registration-path")
                    .unwrap_or_else(|| "/registration".to_string());
                match mount_of(c, &dir) {
                    Some((v, i)) if i.is_empty() && volume_source(d.name(), pod, v) == "hostPath:/var/lib/kubelet/plugins_registry" => {}
                    _ => out.push(format!(
                        "{at}: the registrar's {dir} is not the host's /var/lib/kubelet/plugins_registry"
                    )),
                }
            }
        }
        if dialers == 0 {
            out.push(format!("{at}: no sidecar dials the driver's socket"));
        }
    }
    out
}

/// The flags `snapblk <args> --help` lists.
fn help_flags(args: &[&str]) -> (BTreeSet<String>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run snapblk --help");
    assert!(out.status.success(), "snapblk {args:?} --help failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let flags = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| !w.is_empty())
        .collect();
    (flags, text)
}

/// The driver name snapblk uses when none is given: the `--driver-name` default.
fn default_driver_name() -> String {
    let (_, text) = help_flags(&["csi", "controller"]);
    let after = text
        .split("--driver-name")
        .nth(1)
        .expect("--driver-name in the help");
    let d = after
        .split("[default: ")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("a default driver name in the help");
    d.to_string()
}

/// Every `$(VAR)` in a container's args names an env var of the container (the kubelet
/// leaves an unknown one as it is, which no flag would accept).
fn env_refs_problems(at: &str, c: &Value, out: &mut Vec<String>) {
    let env: BTreeSet<&str> = arr(&c["env"]).iter().map(|e| s(&e["name"])).collect();
    for a in arr(&c["args"]).iter().chain(arr(&c["command"])) {
        let mut rest = s(a);
        while let Some(i) = rest.find("$(") {
            let tail = &rest[i + 2..];
            let Some(j) = tail.find(')') else { break };
            let var = &tail[..j];
            if !env.contains(var) {
                out.push(format!(
                    "{at}: container {} uses $({var}) but sets no such env var",
                    s(&c["name"])
                ));
            }
            rest = &tail[j..];
        }
    }
}

/// Every flag given to snapblk exists in its `--help`, in `--flag=value` form; the driver
/// name given is the default one.
fn snapblk_flag_problems(docs: &[Doc], driver: &str) -> Vec<String> {
    let mut out = vec![];
    let mut seen = 0;
    for (d, pod) in workloads(docs) {
        let at = d.what();
        for c in containers(pod) {
            env_refs_problems(&at, c, &mut out);
            let Some(role) = snapblk_role(c) else {
                continue;
            };
            seen += 1;
            let (known, _) = help_flags(&["csi", &role]);
            for a in arr(&c["args"]).iter().skip(2) {
                let a = s(a);
                let Some((name, _)) = a.strip_prefix("--").and_then(|f| f.split_once('=')) else {
                    out.push(format!(
                        "{at}: snapblk csi {role} argument {a:?} is not --flag=value"
                    ));
                    continue;
                };
                if !known.contains(name) {
                    out.push(format!(
                        "{at}: snapblk csi {role} has no flag --{name} (see snapblk csi {role} --help)"
                    ));
                }
            }
            if let Some(n) = flag(c, "driver-name") {
                if n != driver {
                    out.push(format!("{at}: --driver-name={n}, the driver is {driver}"));
                }
            }
        }
    }
    if seen < 2 {
        out.push(format!(
            "found {seen} snapblk csi containers, expected the controller and the node plugin"
        ));
    }
    out
}

/// The flags each sidecar takes at the version its image pins, read from its source:
/// cmd/*/main.go, and csi-lib-utils' standardflags where the sidecar registers them.
fn sidecar_flags(name: &str) -> Option<(&'static str, Vec<&'static str>)> {
    const STANDARD: &[&str] = &[
        "csi-address",
        "kubeconfig",
        "version",
        "leader-election",
        "leader-election-namespace",
        "leader-election-lease-duration",
        "leader-election-renew-deadline",
        "leader-election-retry-period",
        "leader-election-labels",
        "kube-api-qps",
        "kube-api-burst",
        "http-endpoint",
        "metrics-address",
        "metrics-path",
        "automaxprocs",
        "feature-gates",
        "v",
    ];
    let (tag, own): (&str, &[&str]) = match name {
        "csi-provisioner" => (
            "v6.3.0",
            &[
                "capacity-for-immediate-binding",
                "capacity-ownerref-level",
                "capacity-poll-interval",
                "capacity-threads",
                "cloning-protection-threads",
                "controller-publish-readonly",
                "default-fstype",
                "enable-capacity",
                "enable-pprof",
                "extra-create-metadata",
                "immediate-topology",
                "kube-api-capacity-burst",
                "master",
                "node-deployment",
                "node-deployment-base-delay",
                "node-deployment-immediate-binding",
                "node-deployment-max-delay",
                "prevent-volume-mode-conversion",
                "retry-interval-max",
                "retry-interval-start",
                "snapshot-orphan-sweep-interval",
                "strict-topology",
                "timeout",
                "volume-name-prefix",
                "volume-name-uuid-length",
                "worker-threads",
            ],
        ),
        "csi-snapshotter" => (
            "v8.6.0",
            &[
                "extra-create-metadata",
                "groupsnapshot-name-prefix",
                "groupsnapshot-name-uuid-length",
                "node-deployment",
                "resync-period",
                "retry-interval-max",
                "retry-interval-start",
                "snapshot-name-prefix",
                "snapshot-name-uuid-length",
                "timeout",
                "worker-threads",
            ],
        ),
        "csi-resizer" => (
            "v2.2.1",
            &[
                "extra-modify-metadata",
                "handle-volume-inuse-error",
                "master",
                "resync-period",
                "retry-interval-max",
                "retry-interval-start",
                "timeout",
                "workers",
            ],
        ),
        // Its own flag set, not csi-lib-utils' (pkg/sidecar/sidecar.go).
        "csi-snapshot-metadata" => {
            return Some((
                "v1.1.0",
                vec![
                    "csi-address",
                    "timeout",
                    "port",
                    "http-endpoint",
                    "kube-api-burst",
                    "kube-api-qps",
                    "kubeconfig",
                    "max-streaming-duration-min",
                    "metrics-path",
                    "tls-cert",
                    "tls-key",
                    "version",
                    "audience",
                    "disable-metrics",
                    "v",
                ],
            ))
        }
        "livenessprobe" => {
            return Some((
                "v2.19.0",
                vec![
                    "probe-timeout",
                    "csi-address",
                    "health-port",
                    "metrics-address",
                    "http-endpoint",
                    "metrics-path",
                    "v",
                ],
            ))
        }
        "csi-node-driver-registrar" => {
            return Some((
                "v2.17.0",
                vec![
                    "connection-timeout",
                    "timeout",
                    "csi-address",
                    "plugin-registration-path",
                    "kubelet-registration-path",
                    "health-port",
                    "http-endpoint",
                    "version",
                    "mode",
                    "enable-pprof",
                    "v",
                ],
            ))
        }
        _ => return None,
    };
    Some((tag, STANDARD.iter().chain(own).copied().collect()))
}

/// Sidecar images are the pinned releases the flag table knows, from registry.k8s.io;
/// their flags exist there. No image floats (latest, canary, main, or no tag).
fn sidecar_problems(docs: &[Doc]) -> Vec<String> {
    let mut out = vec![];
    for (d, pod) in workloads(docs) {
        let at = d.what();
        for c in containers(pod) {
            let (name, tag) = image(c);
            let cname = s(&c["name"]);
            if tag.is_empty() || matches!(tag.as_str(), "latest" | "canary" | "main") {
                out.push(format!(
                    "{at}: container {cname}: image {} is not pinned",
                    s(&c["image"])
                ));
            }
            if name == "snapblk" {
                continue;
            }
            let Some((want_tag, known)) = sidecar_flags(&name) else {
                out.push(format!(
                    "{at}: container {cname}: unknown image {name} (add its flags to this test)"
                ));
                continue;
            };
            if !s(&c["image"]).starts_with("registry.k8s.io/sig-storage/") {
                out.push(format!(
                    "{at}: container {cname}: take {name} from registry.k8s.io/sig-storage"
                ));
            }
            if tag != want_tag {
                out.push(format!(
                    "{at}: container {cname}: {name}:{tag}, but this test knows the flags of {want_tag}: check them and update the table"
                ));
            }
            for (f, _) in flags(c) {
                if !known.contains(&f.as_str()) {
                    out.push(format!(
                        "{at}: container {cname}: {name} {want_tag} has no flag --{f}"
                    ));
                }
            }
        }
    }
    out
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit(':').next()?.parse().ok()
}

/// The containerPort a Service's or probe's port (a number or a name) means in a pod.
fn container_port(pod: &Value, p: &Value) -> Option<u64> {
    if let Some(n) = p.as_u64() {
        return Some(n);
    }
    containers(pod)
        .flat_map(|c| arr(&c["ports"]))
        .find(|cp| s(&cp["name"]) == s(p))
        .and_then(|cp| cp["containerPort"].as_u64())
}

/// The pods a Service's selector picks.
fn selected<'a>(docs: &'a [Doc], svc: &Doc) -> Vec<(&'a Doc, &'a Value)> {
    let sel = svc.v["spec"]["selector"].as_object();
    workloads(docs)
        .into_iter()
        .filter(|(d, _)| d.namespace() == svc.namespace())
        .filter(|(d, _)| {
            let labels = &d.v["spec"]["template"]["metadata"]["labels"];
            sel.is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[k] == v))
        })
        .collect()
}

/// The pod port a Service's port `port` leads to.
fn service_target(docs: &[Doc], ns: &str, name: &str, port: u16) -> Result<u64, String> {
    let svc = docs
        .iter()
        .find(|d| d.kind() == "Service" && d.name() == name && d.namespace() == ns)
        .ok_or_else(|| format!("no Service {ns}/{name}"))?;
    let p = arr(&svc.v["spec"]["ports"])
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .ok_or_else(|| format!("Service {ns}/{name} has no port {port}"))?;
    let target = if p["targetPort"].is_null() {
        &p["port"]
    } else {
        &p["targetPort"]
    };
    let pods = selected(docs, svc);
    if pods.len() != 1 {
        return Err(format!(
            "Service {ns}/{name} selects {} workloads, expected one",
            pods.len()
        ));
    }
    container_port(pods[0].1, target)
        .ok_or_else(|| format!("Service {ns}/{name}: target port {target} is no container port"))
}

/// Ports and addresses: the node plugin's --controller is the controller's Service, whose
/// port leads to the controller's --listen; --agent-address uses --agent-listen's port; the
/// SnapshotMetadataService's address leads to the sidecar's --port; every probe's port is
/// a container port of its pod; the pod's HTTP endpoints do not collide.
fn port_problems(docs: &[Doc]) -> Vec<String> {
    let mut out = vec![];
    let mut listen = None;
    for (d, pod) in workloads(docs) {
        let at = d.what();
        let mut http: BTreeMap<u16, String> = BTreeMap::new();
        for c in containers(pod) {
            let cname = s(&c["name"]).to_string();
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let p = &c[probe]["httpGet"]["port"];
                if !p.is_null() && container_port(pod, p).is_none() {
                    out.push(format!(
                        "{at}: {cname}'s {probe} port {p} is no container port"
                    ));
                }
            }
            for (f, v) in flags(c) {
                if matches!(
                    f.as_str(),
                    "http-endpoint" | "listen" | "agent-listen" | "port" | "metrics-addr"
                ) {
                    let Some(p) = port_of(&v) else {
                        out.push(format!("{at}: {cname} --{f}={v}: no port"));
                        continue;
                    };
                    if let Some(other) = http.insert(p, cname.clone()) {
                        out.push(format!("{at}: {cname} and {other} both listen on {p}"));
                    }
                }
            }
            // The metrics endpoint has a container port named `metrics` to scrape.
            if let Some(m) = flag(c, "metrics-addr") {
                let named = arr(&c["ports"])
                    .iter()
                    .find(|p| s(&p["name"]) == "metrics")
                    .and_then(|p| p["containerPort"].as_u64());
                if named.is_none() || named != port_of(&m).map(u64::from) {
                    out.push(format!(
                        "{at}: {cname} --metrics-addr={m} has no container port named metrics with its port"
                    ));
                }
            }
            match snapblk_role(c).as_deref() {
                Some("controller") => listen = flag(c, "listen").and_then(|l| port_of(&l)),
                Some("node") => {
                    let agent = flag(c, "agent-address").unwrap_or_default();
                    let lp = flag(c, "agent-listen").and_then(|l| port_of(&l));
                    if port_of(agent.trim_end_matches('/')) != lp || lp.is_none() {
                        out.push(format!(
                            "{at}: --agent-address={agent} does not use --agent-listen's port"
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    // The node plugin reaches the controller through its Service.
    for (d, pod) in workloads(docs) {
        for c in containers(pod) {
            let Some(url) = flag(c, "controller") else {
                continue;
            };
            let at = d.what();
            let host_port = url.strip_prefix("http://").unwrap_or("");
            let (host, port) = host_port.split_once(':').unwrap_or((host_port, ""));
            let parts: Vec<&str> = host.split('.').collect();
            let (Some(svc), Some(ns), Ok(port)) =
                (parts.first(), parts.get(1), port.parse::<u16>())
            else {
                out.push(format!(
                    "{at}: --controller={url} is not http://SERVICE.NAMESPACE.svc:PORT"
                ));
                continue;
            };
            match service_target(docs, ns, svc, port) {
                Ok(t) if Some(t) == listen.map(u64::from) => {}
                Ok(t) => out.push(format!(
                    "{at}: --controller={url} leads to port {t}, the controller listens on {listen:?}"
                )),
                Err(e) => out.push(format!("{at}: --controller={url}: {e}")),
            }
        }
    }
    // Backup clients reach the snapshot-metadata sidecar through the address advertised.
    for sms in docs
        .iter()
        .filter(|d| d.kind() == "SnapshotMetadataService")
    {
        let addr = s(&sms.v["spec"]["address"]);
        let (host, port) = addr.split_once(':').unwrap_or((addr, ""));
        let parts: Vec<&str> = host.split('.').collect();
        let sidecar_port = workloads(docs)
            .iter()
            .flat_map(|(_, pod)| containers(pod))
            .find(|c| image(c).0 == "csi-snapshot-metadata")
            .and_then(|c| flag(c, "port"))
            .and_then(|p| p.parse::<u64>().ok());
        match (parts.first(), parts.get(1), port.parse::<u16>()) {
            (Some(svc), Some(ns), Ok(port)) => match service_target(docs, ns, svc, port) {
                Ok(t) if Some(t) == sidecar_port => {}
                Ok(t) => out.push(format!(
                    "{}: address {addr} leads to port {t}, the sidecar serves {sidecar_port:?}",
                    sms.what()
                )),
                Err(e) => out.push(format!("{}: address {addr}: {e}", sms.what())),
            },
            _ => out.push(format!(
                "{}: address {addr:?} is not SERVICE.NAMESPACE:PORT",
                sms.what()
            )),
        }
        // A certificate issued here must name that host.
        for cert in docs.iter().filter(|d| d.kind() == "Certificate") {
            let names: Vec<&str> = arr(&cert.v["spec"]["dnsNames"]).iter().map(s).collect();
            if !cert.v["spec"]["isCA"].as_bool().unwrap_or(false) && !names.contains(&host) {
                out.push(format!("{}: dnsNames lack {host}", cert.what()));
            }
        }
    }
    out
}

/// Files that flags name (token, TLS certificate and key) are in the Secret volumes meant
/// for them, mounted in the container that reads them; a cert-manager Certificate writes
/// the Secret the sidecar mounts.
fn secret_problems(docs: &[Doc]) -> Vec<String> {
    let mut out = vec![];
    let mut tls_secrets = BTreeSet::new();
    for (d, pod) in workloads(docs) {
        let at = d.what();
        for c in containers(pod) {
            for (f, want) in [
                ("token-file", "snapblk-token"),
                ("tls-cert", "snapblk-snapshot-metadata-tls"),
                ("tls-key", "snapblk-snapshot-metadata-tls"),
            ] {
                let Some(path) = flag(c, f) else { continue };
                let src = mount_of(c, &path).map(|(v, i)| (volume_source(d.name(), pod, v), i));
                let key = Path::new(&path)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("");
                match src {
                    Some((src, inside)) if src == format!("secret:{want}") && inside == format!("/{key}") => {
                        if want.ends_with("-tls") {
                            tls_secrets.insert(want);
                        }
                    }
                    other => out.push(format!(
                        "{at}: {} --{f}={path} is not the key {key} of Secret {want} (mounted: {other:?})",
                        s(&c["name"])
                    )),
                }
            }
        }
    }
    if tls_secrets.is_empty() {
        out.push("no container reads the snapshot-metadata TLS Secret".into());
    }
    for cert in docs.iter().filter(|d| d.kind() == "Certificate") {
        if cert.v["spec"]["isCA"].as_bool().unwrap_or(false) {
            continue;
        }
        let secret = s(&cert.v["spec"]["secretName"]);
        if !tls_secrets.contains(secret) {
            out.push(format!(
                "{}: writes Secret {secret}, which no container mounts",
                cert.what()
            ));
        }
    }
    out
}

/// The driver name is the same everywhere; the classes' parameters are ones the driver
/// accepts; the classes carry what Kubernetes and the backup tools look for.
fn driver_problems(docs: &[Doc], driver: &str) -> Vec<String> {
    use snapblk::csi::params::{SnapshotParams, VolumeParams};
    let mut out = vec![];
    let mut want = |d: Option<&Doc>, what: &str| match d {
        Some(_) => {}
        None => out.push(format!("missing: {what}")),
    };
    want(
        find(docs, "CSIDriver", driver),
        "the CSIDriver named after the driver",
    );
    want(
        find(docs, "SnapshotMetadataService", driver),
        "the SnapshotMetadataService named after the driver",
    );
    want(
        docs.iter().find(|d| d.kind() == "StorageClass"),
        "a StorageClass",
    );
    want(
        docs.iter().find(|d| d.kind() == "VolumeSnapshotClass"),
        "a VolumeSnapshotClass",
    );
    want(
        docs.iter().find(|d| d.kind() == "VolumeGroupSnapshotClass"),
        "a VolumeGroupSnapshotClass",
    );
    for d in docs {
        let at = d.what();
        let v = &d.v;
        let params = || -> HashMap<String, String> {
            v["parameters"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, x)| (k.clone(), s(x).to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        match d.kind() {
            "CSIDriver" => {
                let spec = &v["spec"];
                if d.name() != driver {
                    out.push(format!("{at}: the driver is {driver}"));
                }
                if spec["attachRequired"] != Value::Bool(false) {
                    out.push(format!("{at}: attachRequired must be false (no attacher)"));
                }
                if arr(&spec["volumeLifecycleModes"]) != [Value::from("Persistent")] {
                    out.push(format!("{at}: volumeLifecycleModes must be [Persistent]"));
                }
                let capacity = workloads(docs)
                    .iter()
                    .any(|(_, pod)| containers(pod).any(|c| flag(c, "enable-capacity").is_some()));
                if spec["storageCapacity"].as_bool().unwrap_or(false) != capacity {
                    out.push(format!(
                        "{at}: storageCapacity must be {capacity}, as the provisioner's --enable-capacity"
                    ));
                }
            }
            "StorageClass" => {
                if s(&v["provisioner"]) != driver {
                    out.push(format!("{at}: provisioner must be {driver}"));
                }
                if s(&v["volumeBindingMode"]) != "WaitForFirstConsumer" {
                    out.push(format!(
                        "{at}: node-local volumes need WaitForFirstConsumer"
                    ));
                }
                if v["allowVolumeExpansion"] != Value::Bool(true) {
                    out.push(format!("{at}: allowVolumeExpansion must be true"));
                }
                if let Err(e) = VolumeParams::try_from(&params()) {
                    out.push(format!(
                        "{at}: the driver refuses the parameters: {}",
                        e.message()
                    ));
                }
            }
            "VolumeSnapshotClass" | "VolumeGroupSnapshotClass" => {
                if s(&v["driver"]) != driver {
                    out.push(format!("{at}: driver must be {driver}"));
                }
                if let Err(e) = SnapshotParams::try_from(&params()) {
                    out.push(format!(
                        "{at}: the driver refuses the parameters: {}",
                        e.message()
                    ));
                }
                if d.kind() == "VolumeSnapshotClass" {
                    let a = &v["metadata"]["annotations"];
                    let l = &v["metadata"]["labels"];
                    if s(&a["k10.kasten.io/is-snapshot-class"]) != "true" {
                        out.push(format!("{at}: Kasten K10 needs the annotation k10.kasten.io/is-snapshot-class: \"true\""));
                    }
                    if s(&l["cloudcasa.io/csi-volumesnapshot-class"]) != "true" {
                        out.push(format!("{at}: CloudCasa needs the label cloudcasa.io/csi-volumesnapshot-class: \"true\""));
                    }
                }
            }
            "SnapshotMetadataService" if d.name() != driver => {
                out.push(format!("{at}: must be named after the driver, {driver}"));
            }
            _ => {}
        }
    }
    out
}

/// Every manifest is in the kustomization (but the ones left out on purpose), and every
/// resource it lists exists.
fn kustomization_problems(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for k in yaml_files(dir).into_iter().filter(|p| is_kustomization(p)) {
        let here = k.parent().expect("a folder");
        let text = std::fs::read_to_string(&k).expect("read kustomization");
        let v: Value = serde_norway::from_str(&text).expect("parse kustomization");
        let listed: Vec<&str> = arr(&v["resources"]).iter().map(s).collect();
        for r in &listed {
            if !here.join(r).exists() {
                out.push(format!("{}: lists {r}, which does not exist", k.display()));
            }
        }
        for e in std::fs::read_dir(here).expect("read folder") {
            let p = e.expect("entry").path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_file()
                && name.ends_with(".yaml")
                && name != "kustomization.yaml"
                && !NOT_IN_KUSTOMIZATION.contains(&name)
                && !listed.contains(&name)
            {
                out.push(format!("{}: does not list {name}", k.display()));
            }
        }
    }
    out
}

/// A workload's container, to break it.
fn container_mut<'a>(v: &'a mut Value, name: &str) -> &'a mut Value {
    v["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .iter_mut()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn assert_none(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// The tests

#[test]
fn builtin_objects_validate_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = yaml_files(Path::new(DIR))
        .into_iter()
        .filter(|p| !is_kustomization(p))
        .collect();
    assert_none("kubernetes-validate --strict", validate_problems(&files));
}

#[test]
fn custom_objects_have_the_fields_their_crds_require() {
    let docs = load();
    for kind in CUSTOM_KINDS {
        assert!(
            docs.iter().any(|d| d.kind() == *kind),
            "no {kind} in the manifests"
        );
    }
    assert_none("custom objects", crd_problems(&docs));
}

#[test]
fn sidecars_dial_the_socket_the_driver_serves() {
    let docs = load();
    assert_none("sockets", socket_problems(&docs, &default_driver_name()));
}

#[test]
fn snapblk_flags_exist() {
    let docs = load();
    assert_none(
        "snapblk flags",
        snapblk_flag_problems(&docs, &default_driver_name()),
    );
}

#[test]
fn sidecar_images_are_pinned_and_their_flags_exist() {
    assert_none("sidecars", sidecar_problems(&load()));
}

#[test]
fn ports_services_and_addresses_agree() {
    assert_none("ports", port_problems(&load()));
}

#[test]
fn flags_point_at_mounted_secrets() {
    assert_none("secrets", secret_problems(&load()));
}

#[test]
fn driver_name_topology_key_and_classes_agree_with_the_code() {
    let driver = default_driver_name();
    assert_none("driver", driver_problems(&load(), &driver));
    // The topology key is derived from the driver name in the code; the documentation
    // that users read (and select nodes by) must name the same key.
    let key = snapblk::csi::controller::topology_key(&driver);
    for doc in ["docs/csi.md", "docs/kubernetes.md"] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc))
            .unwrap_or_else(|e| panic!("{doc}: {e}"));
        assert!(
            text.contains(&key),
            "{doc} does not name the topology key {key}"
        );
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    assert_none("kustomization", kustomization_problems(Path::new(DIR)));
}

/// Each check above must be able to fail: break a copy of the manifests in one place per
/// check and see that the check names the break.
#[test]
fn broken_manifests_are_caught() {
    let docs = load();
    let driver = default_driver_name();
    let edit = |kind: &str, name: &str, f: &dyn Fn(&mut Value)| -> Vec<Doc> {
        let mut copy = docs.clone();
        let d = copy
            .iter_mut()
            .find(|d| d.kind() == kind && d.name() == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"));
        f(&mut d.v);
        copy
    };
    let caught = |what: &str, problems: Vec<String>, needle: &str| {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{what} was not caught (wanted a problem naming {needle:?}); got {problems:?}"
        );
    };
    let set_arg = |v: &mut Value, cname: &str, prefix: &str, new: &str| {
        let c = container_mut(v, cname);
        let args = c["args"].as_array_mut().expect("args");
        let a = args
            .iter_mut()
            .find(|a| s(a).starts_with(prefix))
            .unwrap_or_else(|| panic!("{cname} has no argument {prefix}"));
        *a = Value::from(new);
    };

    // A field Kubernetes does not know, in a built-in object: kubernetes-validate.
    let tmp = tempfile::tempdir().expect("temp dir");
    let broken = edit("Deployment", "snapblk-controller", &|v| {
        let c = container_mut(v, "snapblk");
        c["mountPropagaton"] = Value::from("Bidirectional");
    });
    let d = find(&broken, "Deployment", "snapblk-controller").expect("deployment");
    let file = tmp.path().join("broken.yaml");
    std::fs::write(&file, serde_norway::to_string(&d.v).expect("yaml")).expect("write");
    caught(
        "an unknown container field",
        validate_problems(std::slice::from_ref(&file)),
        "mountPropagaton",
    );
    // A misspelt kind is not taken for a custom one.
    let mut v = d.v.clone();
    v["kind"] = Value::from("Deploymnet");
    std::fs::write(&file, serde_norway::to_string(&v).expect("yaml")).expect("write");
    caught(
        "a misspelt kind",
        validate_problems(std::slice::from_ref(&file)),
        "Deploymnet",
    );

    // Custom objects: a required field missing, a field the CRD lacks, a bad enum value,
    // a CA that is not base64.
    let broken = edit("VolumeSnapshotClass", "snapblk", &|v| {
        v.as_object_mut().expect("object").remove("driver");
    });
    caught(
        "a class without driver",
        crd_problems(&broken),
        ".driver: required",
    );
    let broken = edit("VolumeGroupSnapshotClass", "snapblk", &|v| {
        v["deletionPolicy"] = Value::from("Keep");
    });
    caught(
        "a bad deletionPolicy",
        crd_problems(&broken),
        "deletionPolicy",
    );
    let broken = edit("SnapshotMetadataService", &driver, &|v| {
        v["spec"]["caCert"] = Value::from("not base64!");
        v["spec"]["port"] = Value::from(6443);
    });
    let p = crd_problems(&broken);
    caught("a CA that is not base64", p.clone(), "caCert: not base64");
    caught("an unknown spec field", p, "spec.port: no such field");
    let broken = edit("Certificate", "snapblk-snapshot-metadata", &|v| {
        v["spec"].as_object_mut().expect("spec").remove("issuerRef");
    });
    caught(
        "a certificate without issuer",
        crd_problems(&broken),
        "issuerRef: required",
    );

    // Sockets: a sidecar dialling another path; a registration path the kubelet cannot reach.
    let broken = edit("Deployment", "snapblk-controller", &|v| {
        set_arg(
            v,
            "csi-resizer",
            "--csi-address",
            "--csi-address=/run/csi/socket",
        );
    });
    caught(
        "a sidecar on another socket",
        socket_problems(&broken, &driver),
        "csi-resizer dials /run/csi/socket",
    );
    let broken = edit("DaemonSet", "snapblk-node", &|v| {
        set_arg(
            v,
            "node-driver-registrar",
            "--kubelet-registration-path",
            "--kubelet-registration-path=/var/lib/kubelet/plugins/other/csi.sock",
        );
    });
    caught(
        "a wrong registration path",
        socket_problems(&broken, &driver),
        "--kubelet-registration-path",
    );

    // snapblk flags: one it does not have; an env var that is not set.
    let broken = edit("DaemonSet", "snapblk-node", &|v| {
        set_arg(
            v,
            "snapblk",
            "--state-dir",
            "--state-folder=/var/lib/snapblk",
        );
    });
    caught(
        "an unknown snapblk flag",
        snapblk_flag_problems(&broken, &driver),
        "no flag --state-folder",
    );
    let broken = edit("DaemonSet", "snapblk-node", &|v| {
        set_arg(v, "snapblk", "--node-id", "--node-id=$(NODENAME)");
    });
    caught(
        "an unset env var",
        snapblk_flag_problems(&broken, &driver),
        "$(NODENAME)",
    );

    // Sidecars: a flag the pinned version lacks; a floating image.
    let broken = edit("Deployment", "snapblk-controller", &|v| {
        set_arg(v, "csi-provisioner", "--timeout", "--timout=30s");
    });
    caught(
        "an unknown sidecar flag",
        sidecar_problems(&broken),
        "no flag --timout",
    );
    let broken = edit("DaemonSet", "snapblk-node", &|v| {
        let c = container_mut(v, "liveness-probe");
        c["image"] = Value::from("registry.k8s.io/sig-storage/livenessprobe:canary");
    });
    caught("a floating image", sidecar_problems(&broken), "not pinned");

    // Ports: the controller's Service on another port; colliding HTTP endpoints.
    let broken = edit("Service", "snapblk-controller", &|v| {
        v["spec"]["ports"][0]["targetPort"] = Value::from(9812);
    });
    caught(
        "a Service missing the registry",
        port_problems(&broken),
        "--controller=",
    );
    let broken = edit("Deployment", "snapblk-controller", &|v| {
        set_arg(v, "csi-resizer", "--http-endpoint", "--http-endpoint=:8080");
    });
    caught(
        "two endpoints on one port",
        port_problems(&broken),
        "both listen on 8080",
    );
    let broken = edit("DaemonSet", "snapblk-node", &|v| {
        set_arg(
            v,
            "snapblk",
            "--metrics-addr",
            "--metrics-addr=0.0.0.0:9900",
        );
    });
    caught(
        "metrics on a port nobody scrapes",
        port_problems(&broken),
        "--metrics-addr=0.0.0.0:9900",
    );

    // Secrets: the token file outside the token Secret.
    let broken = edit("DaemonSet", "snapblk-node", &|v| {
        set_arg(v, "snapblk", "--token-file", "--token-file=/etc/token");
    });
    caught(
        "a token file not mounted",
        secret_problems(&broken),
        "--token-file=/etc/token",
    );

    // Driver and classes: another driver name; a parameter the driver refuses.
    let broken = edit("StorageClass", "snapblk", &|v| {
        v["provisioner"] = Value::from("snapblk.io");
    });
    caught(
        "a StorageClass of another driver",
        driver_problems(&broken, &driver),
        "provisioner must be",
    );
    let broken = edit("VolumeSnapshotClass", "snapblk", &|v| {
        v["parameters"]["freezeTimout"] = Value::from("10s");
    });
    caught(
        "a misspelt class parameter",
        driver_problems(&broken, &driver),
        "freezeTimout",
    );

    // The kustomization: a manifest it does not list.
    let dir = tmp.path().join("k");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("kustomization.yaml"), "resources:\n  - a.yaml\n").expect("write");
    std::fs::write(dir.join("a.yaml"), "kind: Namespace\n").expect("write");
    std::fs::write(dir.join("b.yaml"), "kind: Namespace\n").expect("write");
    caught(
        "an unlisted manifest",
        kustomization_problems(&dir),
        "does not list b.yaml",
    );
}
