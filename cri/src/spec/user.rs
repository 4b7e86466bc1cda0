//! Resolving a container user ("name", "uid", "uid:gid", "name:group") to
//! numeric ids from the image's own /etc/passwd and /etc/group, the way
//! containerd's `oci.WithUser` and `WithAdditionalGIDs` do.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::SpecError;

/// An image is untrusted: a multi-gigabyte "/etc/passwd" must not exhaust the
/// server's memory. Real files are a few KiB.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// Numeric identity of a container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// The primary gid first, then the groups of /etc/group that list the
    /// user as a member (containerd's `ensureAdditionalGids` order).
    pub additional_gids: Vec<u32>,
}

/// Resolves `user` ("name", "uid", "uid:gid", "name:group", ...) against the
/// account files inside `rootfs`.
///
/// Files are opened with `RESOLVE_IN_ROOT`, so symlinks (absolute or `..`)
/// in the image resolve inside `rootfs` as they would inside the container,
/// never to the host's files. As containerd does: a numeric uid missing from
/// /etc/passwd (or no /etc/passwd at all) gets gid 0; a missing name is an
/// error.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ResolvedUser, SpecError> {
    let invalid = |reason: String| SpecError::Invalid {
        field: "user",
        value: user.to_owned(),
        reason,
    };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(invalid("empty user or group name".to_owned()));
    }
    let passwd = read_in_root(rootfs, "etc/passwd")?.map(|text| parse_passwd(&text));
    let passwd = passwd.as_deref().unwrap_or_default();

    let (uid, passwd_gid, name) = match parse_id(user_part) {
        Some(uid) => {
            let entry = passwd.iter().find(|e| e.uid == uid);
            (
                uid,
                entry.map_or(0, |e| e.gid),
                entry.map(|e| e.name.clone()),
            )
        }
        None => {
            let entry = passwd.iter().find(|e| e.name == user_part).ok_or_else(|| {
                invalid(format!("no user {user_part:?} in the image's /etc/passwd"))
            })?;
            (entry.uid, entry.gid, Some(entry.name.clone()))
        }
    };

    // Only read /etc/group when a name must be looked up or memberships
    // can exist; an image without it simply has no supplementary groups.
    let groups = if name.is_some() || group_part.is_some_and(|g| parse_id(g).is_none()) {
        read_in_root(rootfs, "etc/group")?.map(|text| parse_group(&text))
    } else {
        None
    };
    let groups = groups.as_deref().unwrap_or_default();

    let gid = match group_part {
        None => passwd_gid,
        Some(group) => match parse_id(group) {
            Some(gid) => gid,
            None => groups
                .iter()
                .find(|g| g.name == group)
                .map(|g| g.gid)
                .ok_or_else(|| invalid(format!("no group {group:?} in the image's /etc/group")))?,
        },
    };

    let mut additional_gids = vec![gid];
    if let Some(name) = &name {
        for group in groups {
            // A group named like the user is its primary group, not a
            // supplementary one (containerd skips it the same way).
            if group.name != *name
                && group.members.iter().any(|m| m == name)
                && !additional_gids.contains(&group.gid)
            {
                additional_gids.push(group.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

/// A decimal id that fits a u32; anything else is taken as a name.
fn parse_id(text: &str) -> Option<u32> {
    if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

#[derive(Debug)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

#[derive(Debug)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Lines that do not parse are skipped, as libc and runc skip them.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.trim();
            let _password = fields.next()?;
            let uid = fields.next()?.trim().parse().ok()?;
            let gid = fields.next()?.trim().parse().ok()?;
            (!name.is_empty() && !name.starts_with('#')).then(|| PasswdEntry {
                name: name.to_owned(),
                uid,
                gid,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.trim();
            let _password = fields.next()?;
            let gid = fields.next()?.trim().parse().ok()?;
            let members = fields
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            (!name.is_empty() && !name.starts_with('#')).then(|| GroupEntry {
                name: name.to_owned(),
                gid,
                members,
            })
        })
        .collect()
}

/// Reads `rootfs/relative` resolving every path component inside `rootfs`;
/// `None` if the file does not exist there.
fn read_in_root(rootfs: &Path, relative: &str) -> Result<Option<String>, SpecError> {
    let path = rootfs.join(relative);
    let err = |source: io::Error| SpecError::ReadImageFile {
        path: path.clone(),
        source,
    };
    let root = rustix::fs::open(
        rootfs,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    let fd = match rustix::fs::openat2(
        &root,
        relative,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(err(e.into())),
    };
    let mut file = File::from(fd);
    if !file.metadata().map_err(err)?.is_file() {
        return Err(err(io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.by_ref()
        .take(MAX_ACCOUNT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_ACCOUNT_FILE {
        return Err(err(io::Error::other(format!(
            "larger than {MAX_ACCOUNT_FILE} bytes"
        ))));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
broken line
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1001::/home/app:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
app:x:1001:app
staff:x:50:app,other
video:x:44: other , app
nogroup:x:65534:
";

    fn rootfs(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        if let Some(text) = passwd {
            fs::write(dir.path().join("etc/passwd"), text).unwrap();
        }
        if let Some(text) = group {
            fs::write(dir.path().join("etc/group"), text).unwrap();
        }
        dir
    }

    fn user(uid: u32, gid: u32, additional_gids: &[u32]) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
        }
    }

    #[test]
    fn name_gets_passwd_ids_and_member_groups() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        // The group named "app" is the primary group: not added twice.
        assert_eq!(
            resolve_user(dir.path(), "app").unwrap(),
            user(1000, 1001, &[1001, 50, 44])
        );
        assert_eq!(resolve_user(dir.path(), "root").unwrap(), user(0, 0, &[0]));
    }

    #[test]
    fn numeric_uid_uses_passwd_gid_or_zero() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        assert_eq!(
            resolve_user(dir.path(), "1000").unwrap(),
            user(1000, 1001, &[1001, 50, 44])
        );
        assert_eq!(
            resolve_user(dir.path(), "4242").unwrap(),
            user(4242, 0, &[0])
        );
    }

    #[test]
    fn explicit_group_by_id_or_name() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        assert_eq!(
            resolve_user(dir.path(), "app:50").unwrap(),
            user(1000, 50, &[50, 44])
        );
        assert_eq!(
            resolve_user(dir.path(), "4242:video").unwrap(),
            user(4242, 44, &[44])
        );
        assert_eq!(resolve_user(dir.path(), "7:8").unwrap(), user(7, 8, &[8]));
    }

    #[test]
    fn missing_names_are_errors_naming_the_value() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        let err = resolve_user(dir.path(), "ghost").unwrap_err().to_string();
        assert!(
            err.contains("\"ghost\"") && err.contains("/etc/passwd"),
            "{err}"
        );
        let err = resolve_user(dir.path(), "app:ghosts")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"ghosts\"") && err.contains("/etc/group"),
            "{err}"
        );
        let err = resolve_user(dir.path(), ":5").unwrap_err().to_string();
        assert!(err.contains("user \":5\""), "{err}");
        let err = resolve_user(dir.path(), "99999999999")
            .unwrap_err()
            .to_string();
        assert!(err.contains("99999999999"), "{err}");
    }

    #[test]
    fn image_without_account_files() {
        let dir = rootfs(None, None);
        assert_eq!(resolve_user(dir.path(), "0").unwrap(), user(0, 0, &[0]));
        assert_eq!(resolve_user(dir.path(), "5:6").unwrap(), user(5, 6, &[6]));
        assert!(resolve_user(dir.path(), "app").is_err());
        assert!(resolve_user(dir.path(), "5:staff").is_err());
    }

    #[test]
    fn absolute_symlink_stays_inside_rootfs() {
        // A host file the image must never see.
        let host = tempfile::tempdir().unwrap();
        let host_passwd = host.path().join("passwd");
        fs::write(&host_passwd, "evil:x:0:0::/:/bin/sh\n").unwrap();

        let dir = rootfs(None, None);
        symlink(&host_passwd, dir.path().join("etc/passwd")).unwrap();
        // Resolved as <rootfs>/<host path>, which does not exist.
        assert!(resolve_user(dir.path(), "evil").is_err());

        // The same absolute link, now to a file inside the rootfs: followed.
        let inner = dir.path().join(host_passwd.strip_prefix("/").unwrap());
        fs::create_dir_all(inner.parent().unwrap()).unwrap();
        fs::write(&inner, "inner:x:7:7::/:/bin/sh\n").unwrap();
        assert_eq!(resolve_user(dir.path(), "inner").unwrap(), user(7, 7, &[7]));
    }

    #[test]
    fn dotdot_symlinks_cannot_climb_out() {
        let outer = tempfile::tempdir().unwrap();
        fs::write(outer.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        let root = outer.path().join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("../../passwd", root.join("etc/passwd")).unwrap();
        assert!(resolve_user(&root, "evil").is_err());
        // A symlinked /etc directory pointing outside is confined too.
        fs::remove_file(root.join("etc/passwd")).unwrap();
        fs::remove_dir(root.join("etc")).unwrap();
        symlink(outer.path(), root.join("etc")).unwrap();
        assert!(resolve_user(&root, "evil").is_err());
    }

    #[test]
    fn refuses_non_regular_account_file() {
        let dir = rootfs(None, None);
        fs::create_dir(dir.path().join("etc/passwd")).unwrap();
        let err = resolve_user(dir.path(), "0").unwrap_err().to_string();
        assert!(err.contains("etc/passwd"), "{err}");
    }
}
