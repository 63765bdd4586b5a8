//! The Kubernetes manifests of `deploy/`: rendered with `kubectl kustomize` (through
//! `deploy/validate.sh --render`, so the tests use the kubectl the validation uses), then checked as
//! data. The sidecar overlay must leave the AIStore target's own containers and volumes exactly as the
//! sample has them and give the dsort container the same data mounts; every overlay must pass
//! `deploy/validate.sh` (yamllint, kubernetes-validate for the oldest and newest Kubernetes it ships,
//! cross-reference lint); and every `DSORT_*` variable a manifest sets must be one the binary reads.
//!
//! A missing tool (kubectl, kubernetes-validate, yamllint: `validate.sh` exits 3) skips a test
//! loudly, but fails it under CI (`CI` set): `.ci/run` installs them.

use dsort_tests::{dsort, dsort_bin};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `validate.sh`'s exit code when a tool is missing.
const TOOL_MISSING: i32 = 3;

/// Variables dsort reads from the environment without a CLI flag (so `--help` does not list them).
const ENV_ONLY: &[&str] = &[
    // The container's memory limit from the downward API (dsort::memory::MEMORY_LIMIT_ENV).
    "DSORT_MEMORY_LIMIT",
];
/// S3 settings (shardio::s3), read from the environment by every process that touches S3.
const ENV_ONLY_PREFIX: &str = "DSORT_S3_";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root").join("deploy")
}

fn validate_sh(args: &[&str]) -> Output {
    Command::new("bash").arg(deploy_dir().join("validate.sh")).args(args).output().expect("run deploy/validate.sh")
}

/// Skip a test whose tool is missing; under CI, fail it.
fn skip(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{test}: {why} (`.ci/run` installs the deploy tools)");
    eprintln!("SKIPPED {test}: {why}");
}

/// Every document of a multi-document YAML text, as JSON values (empty documents dropped).
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize deploy/<dir>`, parsed; `None` (test skipped) when kubectl is missing.
fn render(test: &str, dir: &str) -> Option<Vec<Value>> {
    let out = validate_sh(&["--render", &deploy_dir().join(dir).display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(TOOL_MISSING) {
        skip(test, stderr.trim());
        return None;
    }
    assert!(out.status.success(), "{test}: rendering deploy/{dir} failed:\n{stderr}");
    Some(yaml_docs(&String::from_utf8_lossy(&out.stdout), dir))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} among the rendered resources"))
}

fn items<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

fn named<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    items(list, what).iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {what} named {name}"))
}

fn names(list: &Value) -> BTreeSet<String> {
    list.as_array().into_iter().flatten().filter_map(|c| c["name"].as_str().map(str::to_string)).collect()
}

/// The env entry `name` of a container.
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    named(&container["env"], name, &format!("env of container {}", container["name"]))
}

fn env_position(container: &Value, name: &str) -> usize {
    items(&container["env"], "env").iter().position(|e| e["name"] == name).unwrap_or_else(|| panic!("no env {name}"))
}

/// The port of `HOST:PORT` or of a URL `scheme://HOST:PORT[/...]`.
fn port_of(addr: &str) -> u64 {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let (_, port) = hostport.rsplit_once(':').unwrap_or_else(|| panic!("{addr}: no port"));
    port.parse().unwrap_or_else(|e| panic!("{addr}: port {port}: {e}"))
}

#[test]
fn sidecar_overlay_patches_the_ais_target() {
    let test = "sidecar_overlay_patches_the_ais_target";
    let Some(docs) = render(test, "overlays/ais-sidecar") else { return };
    let sample_path = deploy_dir().join("overlays/ais-sidecar/sample/ais-target-statefulset.yaml");
    let sample_docs = yaml_docs(&std::fs::read_to_string(&sample_path).expect("read the sample"), "sample");
    let sample = find(&sample_docs, "StatefulSet", "ais-target");
    let sts = find(&docs, "StatefulSet", "ais-target");
    let (pod, sample_pod) = (&sts["spec"]["template"]["spec"], &sample["spec"]["template"]["spec"]);

    // AIStore's own parts are untouched: its containers, init container, volumes, selector and labels.
    let ais = named(&sample_pod["containers"], "aisnode", "sample container");
    assert_eq!(named(&pod["containers"], "aisnode", "container"), ais, "the aisnode container changed");
    assert_eq!(pod["initContainers"], sample_pod["initContainers"], "the init containers changed");
    assert_eq!(pod["volumes"], sample_pod["volumes"], "the pod's volumes changed");
    assert_eq!(sts["spec"]["selector"], sample["spec"]["selector"], "the selector changed");
    assert_eq!(sts["spec"]["volumeClaimTemplates"], sample["spec"]["volumeClaimTemplates"]);
    let labels = sts["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels");
    for (k, v) in sample["spec"]["template"]["metadata"]["labels"].as_object().expect("sample pod labels") {
        assert_eq!(labels.get(k), Some(v), "pod label {k} changed");
    }
    // One more plain container (not a native sidecar among the init containers).
    let mut expected = names(&sample_pod["containers"]);
    expected.insert("dsort-target".into());
    assert_eq!(names(&pod["containers"]), expected);
    assert!(!names(&pod["initContainers"]).contains("dsort-target"), "dsort-target must be a plain container");

    let dsort = named(&pod["containers"], "dsort-target", "container");
    let image = dsort["image"].as_str().expect("dsort-target has an image");
    assert!(image.contains("dsort"), "image {image}");
    assert_eq!(dsort["args"], json!(["serve", "target"]));

    // The same data volumes at the same paths, and a dsort folder in each as its mountpaths.
    let data: Vec<&Value> = items(&ais["volumeMounts"], "aisnode volumeMounts")
        .iter()
        .filter(|m| m["mountPath"].as_str().is_some_and(|p| p.starts_with("/ais/")))
        .collect();
    assert!(!data.is_empty(), "the sample has no data mountpath under /ais/");
    let mounts = items(&dsort["volumeMounts"], "dsort-target volumeMounts");
    for m in &data {
        assert!(
            mounts.iter().any(|d| d["name"] == m["name"] && d["mountPath"] == m["mountPath"]),
            "dsort-target does not mount {} at {}",
            m["name"],
            m["mountPath"]
        );
    }
    let want: Vec<String> = data.iter().map(|m| format!("{}/dsort", m["mountPath"].as_str().unwrap())).collect();
    assert_eq!(env(dsort, "DSORT_MOUNTPATHS")["value"], want.join(","));

    assert_eq!(
        env(dsort, "DSORT_MEMORY_LIMIT")["valueFrom"],
        json!({"resourceFieldRef": {"containerName": "dsort-target", "resource": "limits.memory", "divisor": "1"}})
    );
    // The advertised URL is the pod's IP, defined (downward API) before it is used.
    assert_eq!(env(dsort, "POD_IP")["valueFrom"], json!({"fieldRef": {"fieldPath": "status.podIP"}}));
    assert!(env_position(dsort, "POD_IP") < env_position(dsort, "DSORT_ADVERTISE_URL"));
    let advertise = env(dsort, "DSORT_ADVERTISE_URL")["value"].as_str().expect("DSORT_ADVERTISE_URL value");
    assert!(advertise.starts_with("http://$(POD_IP):"), "{advertise}");
    assert_eq!(
        env(dsort, "DSORT_TOKEN")["valueFrom"],
        json!({"secretKeyRef": {"name": "dsort-token", "key": "token"}})
    );
    assert_eq!(
        env(dsort, "DSORT_CLUSTER_SECRET")["valueFrom"],
        json!({"secretKeyRef": {"name": "dsort-token", "key": "cluster-secret"}})
    );

    // The coordinator URL names the coordinator's Service and its port.
    let svc = find(&docs, "Service", "dsort-coordinator");
    let svc_port = named(&svc["spec"]["ports"], "dsort-api", "coordinator Service port")["port"].as_u64().unwrap();
    assert_eq!(env(dsort, "DSORT_COORDINATOR")["value"], format!("http://dsort-coordinator:{svc_port}"));

    // The named port `dsort` is the port it listens on and advertises.
    let listen = env(dsort, "DSORT_LISTEN")["value"].as_str().expect("DSORT_LISTEN value");
    let port = named(&dsort["ports"], "dsort", "dsort-target port")["containerPort"].as_u64().unwrap();
    assert_eq!(port_of(listen), port, "DSORT_LISTEN={listen}");
    assert_eq!(port_of(advertise), port, "DSORT_ADVERTISE_URL={advertise}");

    // Root for AIStore's root-owned mountpaths, but without any capability or escalation.
    let sc = &dsort["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
}

#[test]
fn every_overlay_validates_offline() {
    let out = validate_sh(&[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.code() == Some(TOOL_MISSING) {
        return skip("every_overlay_validates_offline", stderr.trim());
    }
    assert!(out.status.success(), "deploy/validate.sh failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
}

/// The `DSORT_*` variables `dsort ARGS --help` lists (`[env: NAME=...]`), and the variables of its
/// required options.
fn accepted_env(args: &[String]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut help_args: Vec<&str> = args.iter().map(String::as_str).take_while(|a| !a.starts_with('-')).collect();
    help_args.push("--help");
    let run = dsort(&help_args);
    assert!(run.ok, "{} {help_args:?} failed:\n{}", dsort_bin().display(), run.stderr);
    let mut accepted = BTreeSet::new();
    let mut required = BTreeSet::new();
    let usage = run.stdout.lines().find(|l| l.starts_with("Usage:")).unwrap_or_default().to_string();
    let required_flags: Vec<&str> = usage.split_whitespace().filter(|w| w.starts_with("--")).collect();
    for line in run.stdout.lines() {
        let Some((_, rest)) = line.split_once("[env: ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let flag = line.split_whitespace().find(|w| w.starts_with("--")).unwrap_or_default();
        if required_flags.contains(&flag) {
            required.insert(name.clone());
        }
        accepted.insert(name);
    }
    assert!(!accepted.is_empty(), "dsort {help_args:?} lists no environment variable:\n{}", run.stdout);
    (accepted, required)
}

#[test]
fn manifest_env_is_what_dsort_accepts() {
    let test = "manifest_env_is_what_dsort_accepts";
    let overlays = deploy_dir().join("overlays");
    let mut dirs: Vec<String> = std::fs::read_dir(&overlays)
        .expect("deploy/overlays")
        .map(|e| e.expect("overlay entry").file_name().to_string_lossy().into_owned())
        .filter(|n| overlays.join(n).join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 3, "overlays: {dirs:?}");
    let mut checked = 0;
    for overlay in &dirs {
        let Some(docs) = render(test, &format!("overlays/{overlay}")) else { return };
        for doc in &docs {
            let pod = &doc["spec"]["template"]["spec"];
            for c in pod["containers"].as_array().into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or_default();
                if !name.starts_with("dsort-") {
                    continue;
                }
                let (kind, res) =
                    (doc["kind"].as_str().unwrap_or_default(), doc["metadata"]["name"].as_str().unwrap_or_default());
                let what = format!("overlay {overlay}: {kind}/{res} container {name}");
                let args: Vec<String> = items(&c["args"], &format!("{what}: args"))
                    .iter()
                    .map(|a| a.as_str().expect("string args").to_string())
                    .collect();
                let (accepted, required) = accepted_env(&args);
                let set = names(&c["env"]);
                for var in set.iter().filter(|v| v.starts_with("DSORT_")) {
                    assert!(
                        accepted.contains(var) || ENV_ONLY.contains(&var.as_str()) || var.starts_with(ENV_ONLY_PREFIX),
                        "{what}: `dsort {}` does not read {var} (it reads {accepted:?})",
                        args.join(" ")
                    );
                }
                for var in &required {
                    assert!(set.contains(var), "{what}: required {var} is not set");
                }
                checked += 1;
            }
        }
    }
    // Each overlay has the coordinator and one kind of target.
    assert_eq!(checked, 2 * dirs.len(), "dsort containers checked");
}

/// The local stand-in (`deploy/local/standin.py`) runs each overlay's coordinator and targets with their
/// manifests' args and environment (each pod in its own network namespace when root), cuts one target's
/// link while a job runs and checks the job aborts cleanly (naming the target, no output, no temp files),
/// restores the link, runs the job again and verifies its output, then stops everything with SIGTERM.
#[test]
fn local_stand_in_survives_a_cut_link_on_every_overlay() {
    let test = "local_stand_in_survives_a_cut_link_on_every_overlay";
    for overlay in ["standalone", "daemonset", "ais-sidecar"] {
        let out = Command::new("python3")
            .arg(deploy_dir().join("local/standin.py"))
            .args(["--dsort", &dsort_bin().display().to_string(), "--overlay"])
            .arg(deploy_dir().join("overlays").join(overlay))
            .output()
            .expect("run deploy/local/standin.py");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.code() == Some(TOOL_MISSING) {
            skip(test, stderr.trim());
            return;
        }
        assert!(out.status.success(), "{test}: overlay {overlay}:\n{stdout}\n{stderr}");
        for expected in ["was aborted", "no output object, no temp file", "is up again", "verified", "exited 0"] {
            assert!(stdout.contains(expected), "{test}: overlay {overlay}: no {expected:?} in:\n{stdout}");
        }
        assert!(stdout.trim_end().ends_with("standin: OK"), "{test}: overlay {overlay}:\n{stdout}");
    }
}
