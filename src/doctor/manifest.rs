//! Checks of the kube-apiserver static-pod manifest: it must be told the configuration file,
//! and see both that file and the plugin's socket through hostPath mounts (a socket directory
//! that is not mounted is the classic "connection refused" after enabling KMS).

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use super::Check;

/// The apiserver container: the one named `kube-apiserver`, else the first.
fn container(pod: &Yaml) -> Option<&Yaml> {
    let list = pod["spec"]["containers"].as_vec()?;
    list.iter()
        .find(|c| c["name"].as_str() == Some("kube-apiserver"))
        .or_else(|| list.first())
}

/// Whether `dir` (a mount path) contains `path`.
fn covers(dir: &str, path: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/")) || dir.is_empty()
}

/// Checks the manifest's text for the configuration file `config` and the socket `socket`.
pub fn check(text: &str, path: &Path, config: Option<&str>, socket: Option<&str>) -> Vec<Check> {
    let file = path.display();
    let mut out = Vec::new();
    if let Err(why) = super::yaml_bounds::check(text) {
        out.push(Check::fail(
            format!("{file}: {why}"),
            "point --apiserver-manifest at /etc/kubernetes/manifests/kube-apiserver.yaml",
        ));
        return out;
    }
    let pod = match YamlLoader::load_from_str(text) {
        Ok(d) if !d.is_empty() => d[0].clone(),
        Ok(_) | Err(_) => {
            out.push(Check::fail(
                format!("{file} is not a YAML Pod manifest"),
                "point --apiserver-manifest at /etc/kubernetes/manifests/kube-apiserver.yaml",
            ));
            return out;
        }
    };
    let Some(c) = container(&pod) else {
        out.push(Check::fail(
            format!("{file} has no containers"),
            "point --apiserver-manifest at the kube-apiserver static pod",
        ));
        return out;
    };
    let args: Vec<&str> = ["command", "args"]
        .iter()
        .filter_map(|k| c[*k].as_vec())
        .flatten()
        .filter_map(Yaml::as_str)
        .collect();
    let flag = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--encryption-provider-config=")
            .map(str::to_owned)
            .or_else(|| {
                (*a == "--encryption-provider-config")
                    .then(|| args.get(i + 1).map(|v| (*v).to_owned()))
                    .flatten()
            })
    });
    match (&flag, config) {
        (None, _) => out.push(Check::fail(
            "kube-apiserver has no --encryption-provider-config: nothing is encrypted",
            format!(
                "add `- --encryption-provider-config={}` to its command",
                config.unwrap_or("/etc/kubernetes/enc/encryption-config.yaml")
            ),
        )),
        (Some(f), Some(want)) if f != want => out.push(Check::fail(
            format!("kube-apiserver reads --encryption-provider-config={f}, not {want}"),
            format!("check {f} instead (--encryption-config {f}), or point the flag at {want}"),
        )),
        (Some(f), _) => out.push(Check::pass(format!(
            "kube-apiserver reads --encryption-provider-config={f}"
        ))),
    }
    let mounts: Vec<(String, String)> = c["volumeMounts"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["name"].as_str()?.to_owned(),
                m["mountPath"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let host_path = |name: &str| {
        pod["spec"]["volumes"]
            .as_vec()
            .into_iter()
            .flatten()
            .find(|v| v["name"].as_str() == Some(name))
            .and_then(|v| v["hostPath"]["path"].as_str())
            .map(str::to_owned)
    };
    let config_path = flag.clone().or_else(|| config.map(str::to_owned));
    for (what, target) in [
        ("the encryption configuration", config_path.as_deref()),
        ("the plugin socket", socket),
    ] {
        let Some(target) = target else { continue };
        let mount = mounts.iter().find(|(_, m)| covers(m, target));
        match mount {
            None => out.push(Check::fail(
                format!("no volumeMount of kube-apiserver covers {what} {target}: the container cannot see it"),
                format!(
                    "mount its directory: a hostPath volume for {dir} and a volumeMount at {dir}",
                    dir = Path::new(target).parent().map_or_else(|| target.to_owned(), |p| p.display().to_string())
                ),
            )),
            Some((name, mount_path)) => match host_path(name) {
                // Same path inside and out is what kubeadm does; then the host path must
                // cover the file too.
                Some(hp) if covers(&hp, target) || hp == *mount_path => out.push(Check::pass(format!(
                    "{what} {target} is mounted from the host ({hp} at {mount_path})"
                ))),
                Some(hp) => out.push(Check::fail(
                    format!("{what} {target} is mounted at {mount_path} from host path {hp}, which is another directory"),
                    format!("make the hostPath of volume {name:?} the directory that holds {target} on the host"),
                )),
                None => out.push(Check::fail(
                    format!("volume {name:?} mounted at {mount_path} is not a hostPath volume"),
                    format!("make {name:?} a hostPath volume of the host directory holding {target}"),
                )),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: kube-apiserver, namespace: kube-system}
spec:
  containers:
  - name: kube-apiserver
    command:
    - kube-apiserver
    - --advertise-address=10.0.0.1
    - --encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml
    volumeMounts:
    - {name: enc, mountPath: /etc/kubernetes/enc, readOnly: true}
    - {name: localkms, mountPath: /var/run/localkms}
  volumes:
  - {name: enc, hostPath: {path: /etc/kubernetes/enc, type: DirectoryOrCreate}}
  - {name: localkms, hostPath: {path: /var/run/localkms, type: DirectoryOrCreate}}
"#;
    const CONFIG: &str = "/etc/kubernetes/enc/encryption-config.yaml";
    const SOCKET: &str = "/var/run/localkms/kms.sock";

    fn fails(text: &str) -> Vec<String> {
        check(text, Path::new("m.yaml"), Some(CONFIG), Some(SOCKET))
            .into_iter()
            .filter(|c| !c.ok())
            .map(|c| c.line())
            .collect()
    }

    #[test]
    fn a_kubeadm_manifest_with_both_mounts_passes() {
        assert!(fails(GOOD).is_empty(), "{:?}", fails(GOOD));
    }

    #[test]
    fn a_missing_flag_or_mount_is_named_with_a_fix() {
        let no_flag = GOOD.replace(
            "    - --encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml\n",
            "",
        );
        assert!(fails(&no_flag)
            .iter()
            .any(|f| f.contains("nothing is encrypted")));
        let other = GOOD.replace("enc/encryption-config.yaml", "enc/other.yaml");
        assert!(fails(&other)
            .iter()
            .any(|f| f.contains("not /etc/kubernetes/enc/encryption-config.yaml")));
        let no_socket = GOOD.replace("    - {name: localkms, mountPath: /var/run/localkms}\n", "");
        let f = fails(&no_socket);
        assert!(
            f.iter()
                .any(|f| f.contains("plugin socket") && f.contains("fix:")),
            "{f:?}"
        );
        let wrong_host = GOOD.replace("{path: /var/run/localkms,", "{path: /run/elsewhere,");
        assert!(fails(&wrong_host)
            .iter()
            .any(|f| f.contains("another directory")));
        assert!(!fails("- [").is_empty());
    }
}
