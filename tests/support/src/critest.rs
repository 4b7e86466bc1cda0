//! Stand-ins for the images the cri-tools validation suite (`critest`) pulls,
//! built from Debian's busybox so the suite runs without the internet.
//!
//! Each stand-in gives the suite what it checks of the real image (read from
//! cri-tools' `images/` and `pkg/validate`): its user, its `/etc/passwd` and
//! `/etc/group`, distinct or shared image IDs per tag, a web server on the
//! right port, nginx's pid file and "master process" title, a setuid-root
//! probe printing its effective uid. `scripts/critest-mirror.sh` pushes them
//! to a local registry under the upstream repository paths.
//!
//! Known gaps, failing their specs on any runtime: the image pinned by
//! digest (`test-image-digest@sha256:9700f9…`) cannot be reproduced; and
//! Debian's busybox runs applets inside `sh` without exec, so masking
//! `/bin/ls` does not stop `sh -c ls` (MaskedPaths).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::layout::{self, RunConfig};
use crate::{rootfs, Error};

/// What a stand-in image holds beyond the plain busybox rootfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The e2e busybox image: `sh`.
    Busybox,
    /// A pause image (`bosun-pause`). `marker` makes its ID its own.
    Pause { marker: &'static str },
    /// cri-tools' `image-test`: busybox plus an empty file named `marker`,
    /// so images with different markers have different IDs.
    Marker(&'static str),
    /// cri-tools' `image-user`: busybox with `USER` set.
    User(&'static str),
    /// cri-tools' `image-predefined-group`: uid 1000 in group 50000.
    PredefinedGroup,
    /// nginx stand-in: busybox httpd on `port`, pid file and process title
    /// as nginx has them.
    Nginx { port: u16 },
    /// httpd stand-in: busybox httpd on port 80, logging its name.
    Httpd,
    /// The e2e nonewprivs image: a setuid-root program printing
    /// `Effective uid: N`.
    NoNewPrivs,
}

/// One stand-in and every reference it is served under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandIn {
    /// The tag it gets in the OCI layout.
    pub tag: &'static str,
    pub kind: Kind,
    /// Full references, as critest names them.
    pub references: &'static [&'static str],
}

/// The images critest pulls (Linux, amd64), and the sandbox ("pause") image
/// to configure in containerd, which must not share an ID with `pause:3.9`:
/// a spec counts that image's tags.
pub fn stand_ins() -> Vec<StandIn> {
    macro_rules! gcr {
        ($($name:literal),+) => { &[$(concat!("gcr.io/k8s-staging-cri-tools/", $name)),+] };
    }
    macro_rules! e2e {
        ($name:literal) => {
            &[concat!("registry.k8s.io/e2e-test-images/", $name)]
        };
    }
    vec![
        StandIn {
            tag: "busybox",
            kind: Kind::Busybox,
            references: e2e!("busybox:1.29-2"),
        },
        StandIn {
            tag: "nginx",
            kind: Kind::Nginx { port: 80 },
            references: e2e!("nginx:1.14-2"),
        },
        StandIn {
            tag: "httpd",
            kind: Kind::Httpd,
            references: e2e!("httpd:2.4.39-4"),
        },
        StandIn {
            tag: "nonewprivs",
            kind: Kind::NoNewPrivs,
            references: e2e!("nonewprivs:1.3"),
        },
        StandIn {
            tag: "pause",
            kind: Kind::Pause { marker: "" },
            references: &["registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"],
        },
        StandIn {
            tag: "sandbox",
            kind: Kind::Pause { marker: "sandbox" },
            references: &["registry.k8s.io/pause:3.6"],
        },
        StandIn {
            tag: "hostnet-nginx",
            kind: Kind::Nginx { port: 12003 },
            references: gcr!("hostnet-nginx-amd64:latest"),
        },
        StandIn {
            tag: "user-uid",
            kind: Kind::User("1002"),
            references: gcr!("test-image-user-uid:latest"),
        },
        StandIn {
            tag: "user-username",
            kind: Kind::User("www-data"),
            references: gcr!("test-image-user-username:latest"),
        },
        StandIn {
            tag: "user-uid-group",
            kind: Kind::User("1003:1004"),
            references: gcr!("test-image-user-uid-group:latest"),
        },
        StandIn {
            tag: "user-username-group",
            kind: Kind::User("www-data:1004"),
            references: gcr!("test-image-user-username-group:latest"),
        },
        StandIn {
            tag: "predefined-group",
            kind: Kind::PredefinedGroup,
            references: gcr!("test-image-predefined-group:latest"),
        },
        StandIn {
            tag: "test-1",
            kind: Kind::Marker("test-image-1"),
            references: gcr!("test-image-1:latest"),
        },
        StandIn {
            tag: "test-2",
            kind: Kind::Marker("test-image-2"),
            references: gcr!("test-image-2:latest"),
        },
        StandIn {
            tag: "test-3",
            kind: Kind::Marker("test-image-3"),
            references: gcr!("test-image-3:latest"),
        },
        StandIn {
            tag: "test-latest",
            kind: Kind::Marker("test-image-latest"),
            references: gcr!("test-image-latest:latest"),
        },
        StandIn {
            tag: "test-digest",
            kind: Kind::Marker("test-image-digest"),
            references: gcr!("test-image-digest:latest"),
        },
        StandIn {
            tag: "test-tags",
            kind: Kind::Marker("same-image"),
            references: gcr!(
                "test-image-tags:1",
                "test-image-tags:2",
                "test-image-tags:3"
            ),
        },
        StandIn {
            tag: "test-tag",
            kind: Kind::Marker("test"),
            references: gcr!("test-image-tag:test"),
        },
        StandIn {
            tag: "test-all",
            kind: Kind::Marker("all"),
            references: gcr!("test-image-tag:all"),
        },
    ]
}

// Users and groups of the busybox images cri-tools builds on.
const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
";

const GROUP: &str = "\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
floppy:x:11:
news:x:13:
uucp:x:14:
www-data:x:33:
users:x:100:
nogroup:x:65533:
nobody:x:65534:
";

/// What `adduser`/`addgroup` in `image-predefined-group`'s Dockerfile add.
const PREDEFINED_PASSWD: &str = "default-user:x:1000:1000::/home/default-user:/bin/sh\n";
const PREDEFINED_GROUP: &str =
    "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n";

// Debian's busybox-static has neither `ipcs` nor `pgrep`; the specs use both.
const IPCS: &str = r#"#!/bin/sh
# ipcs -m from /proc/sysvipc/shm: key shmid owner perms bytes nattch
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch"
tail -n +2 /proc/sysvipc/shm | while read key id perms size cpid lpid nattch uid rest; do
  echo "$key $id $uid $perms $size $nattch"
done
"#;

const PGREP: &str = r#"#!/bin/sh
# pgrep NAME: pids whose process name contains NAME
ps -o pid,comm | awk -v n="$1" 'NR > 1 && index($2, n) { print $1; found = 1 } END { exit !found }'
"#;

/// The nginx stand-in's PID 1. Re-executes itself once so that its command
/// line reads "master process", as nginx's retitled master does; its
/// process name is `nginx` (the script's name), as `pidof nginx` expects.
const NGINX: &str = r#"#!/bin/sh
if [ "$1" != "master process" ]; then exec "$0" "master process" "$@"; fi
echo $$ > /var/run/nginx.pid
echo "nginx: serving /usr/share/nginx/html on port $NGINX_PORT"
httpd -f -v -p "$NGINX_PORT" -h /usr/share/nginx/html &
trap 'kill $!; exit 0' TERM QUIT INT
wait
"#;

const HTTPD: &str = r#"#!/bin/sh
echo "httpd: serving /usr/local/apache2/htdocs on port 80"
exec httpd -f -v -p 80 -h /usr/local/apache2/htdocs
"#;

const INDEX_HTML: &str = "<html><body><h1>It works!</h1></body></html>\n";

/// The static programs some stand-ins hold, built from this crate.
#[derive(Debug, Clone)]
pub struct Programs {
    /// `bosun-nnp-probe`, for the nonewprivs image.
    pub nnp_probe: PathBuf,
    /// `bosun-pause`, for the pause images.
    pub pause: PathBuf,
}

impl Programs {
    /// Both programs from `dir` (where cargo put this crate's binaries).
    pub fn in_dir(dir: &Path) -> Programs {
        Programs {
            nnp_probe: dir.join("bosun-nnp-probe"),
            pause: dir.join("bosun-pause"),
        }
    }
}

/// Builds every stand-in into the OCI layout at `layout_dir` (one tag each,
/// [`StandIn::tag`]), using `scratch` for the root filesystems.
pub fn write_layout(
    layout_dir: &Path,
    scratch: &Path,
    programs: &Programs,
) -> Result<Vec<StandIn>, Error> {
    let images = stand_ins();
    for image in &images {
        let root = scratch.join(image.tag);
        if root.exists() {
            fs::remove_dir_all(&root).map_err(Error::io("remove", &root))?;
        }
        let run = build_rootfs(&root, image.kind, programs)?;
        layout::write_with(layout_dir, &format!("critest:{}", image.tag), &root, &run)?;
        fs::remove_dir_all(&root).map_err(Error::io("remove", &root))?;
    }
    Ok(images)
}

/// Fills `root` for `kind` and returns the image's runtime config.
fn build_rootfs(root: &Path, kind: Kind, programs: &Programs) -> Result<RunConfig, Error> {
    rootfs::busybox(root)?;
    write_file(&root.join("etc/passwd"), PASSWD, 0o644)?;
    write_file(&root.join("etc/group"), GROUP, 0o644)?;
    write_file(&root.join("bin/ipcs"), IPCS, 0o755)?;
    write_file(&root.join("bin/pgrep"), PGREP, 0o755)?;
    let mut run = RunConfig::default();
    match kind {
        Kind::Busybox => {}
        Kind::Pause { marker } => {
            if !marker.is_empty() {
                write_file(&root.join(marker), "", 0o644)?;
            }
            copy_program(&programs.pause, &root.join("pause"), 0o755)?;
            run.entrypoint = strings(&["/pause"]);
            run.cmd = Vec::new();
        }
        Kind::Marker(name) => write_file(&root.join(name), "", 0o644)?,
        Kind::User(user) => run.user = user.to_owned(),
        Kind::PredefinedGroup => {
            write_file(
                &root.join("etc/passwd"),
                &format!("{PASSWD}{PREDEFINED_PASSWD}"),
                0o644,
            )?;
            write_file(
                &root.join("etc/group"),
                &format!("{GROUP}{PREDEFINED_GROUP}"),
                0o644,
            )?;
            make_dir(&root.join("home/default-user"))?;
            run.user = "1000".to_owned();
        }
        Kind::Nginx { port } => {
            make_dir(&root.join("usr/sbin"))?;
            make_dir(&root.join("var/run"))?;
            write_file(&root.join("usr/sbin/nginx"), NGINX, 0o755)?;
            write_file(
                &root.join("usr/share/nginx/html/index.html"),
                INDEX_HTML,
                0o644,
            )?;
            run.env.push(format!("NGINX_PORT={port}"));
            run.entrypoint = strings(&["/usr/sbin/nginx"]);
            run.cmd = strings(&["-g", "daemon off;"]);
        }
        Kind::Httpd => {
            write_file(&root.join("usr/local/bin/httpd-foreground"), HTTPD, 0o755)?;
            write_file(
                &root.join("usr/local/apache2/htdocs/index.html"),
                INDEX_HTML,
                0o644,
            )?;
            run.cmd = strings(&["httpd-foreground"]);
            run.working_dir = "/usr/local/apache2".to_owned();
        }
        Kind::NoNewPrivs => {
            make_dir(&root.join("usr/local/bin"))?;
            // Setuid root: the effective uid shows whether no_new_privs held.
            copy_program(
                &programs.nnp_probe,
                &root.join("usr/local/bin/nnp-probe"),
                0o4755,
            )?;
            run.cmd = strings(&["/usr/local/bin/nnp-probe"]);
        }
    }
    Ok(run)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn copy_program(src: &Path, dest: &Path, mode: u32) -> Result<(), Error> {
    fs::copy(src, dest).map_err(Error::io("copy to", dest))?;
    set_mode(dest, mode)
}

fn make_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(Error::io("create directory", path))?;
    set_mode(path, 0o755)
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    fs::write(path, content).map_err(Error::io("write", path))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("chmod", path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::HashSet;

    #[test]
    fn references_are_unique_and_tags_distinct() {
        let images = stand_ins();
        let tags: HashSet<_> = images.iter().map(|i| i.tag).collect();
        assert_eq!(tags.len(), images.len());
        let refs: Vec<_> = images.iter().flat_map(|i| i.references.iter()).collect();
        let unique: HashSet<_> = refs.iter().collect();
        assert_eq!(unique.len(), refs.len());
        for reference in refs {
            layout::tag_of(reference).unwrap();
        }
    }
}
