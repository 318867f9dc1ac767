//! `lbs sync serve | pull | verify` as an operator runs them, over mutual TLS on loopback.

// In tests a panic is the failure report; helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lbs_protocol::{CertificateAuthority, PeerName};

const LBS: &str = env!("CARGO_BIN_EXE_lbs");
const PRIMARY: &str = "00-1A-2B-3C-4D-5E";
const BACKUP: &str = "00-1A-2B-3C-4D-5F";

/// Kills the server if the test fails before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn identities(dir: &Path) {
    let ca = CertificateAuthority::generate("test CA").unwrap();
    ca.trust_root().save(&dir.join("ca.pem")).unwrap();
    // `backup-old`: the backup's certificate from before it was activated again (same SID,
    // another key).
    for (label, sid) in [
        ("primary", PRIMARY),
        ("backup", BACKUP),
        ("backup-old", BACKUP),
    ] {
        ca.issue_identity(&PeerName::Box(sid.parse().unwrap()))
            .unwrap()
            .save(
                &dir.join(format!("{label}.pem")),
                &dir.join(format!("{label}.key")),
            )
            .unwrap();
    }
}

fn lbs(dir: &Path, args: &[&str], me: &str, partner: &str) -> Command {
    let mut cmd = Command::new(LBS);
    cmd.args(args)
        .arg("--identity")
        .arg(dir.join(me))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--partner", partner])
        .arg("--state")
        .arg(dir.join(format!("state-{me}")));
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn serve_pull_verify_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    identities(d);
    let (primary, backup) = (d.join("primary-tree"), d.join("backup-tree"));
    std::fs::create_dir_all(primary.join("voicemail/1234/INBOX")).unwrap();
    std::fs::create_dir_all(&backup).unwrap();
    std::fs::write(primary.join("extensions.conf"), b"[default]\n").unwrap();
    std::fs::write(
        primary.join("voicemail/1234/INBOX/msg0000.wav"),
        vec![3u8; 200_000],
    )
    .unwrap();
    // An old message, as most of a PBX's files are (a file modified within the last second
    // is hashed again on the next pass, by design).
    std::fs::File::options()
        .write(true)
        .open(primary.join("voicemail/1234/INBOX/msg0000.wav"))
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_650_000_000))
        .unwrap();

    let (mut server, addr, drain) = start_serve(d, &primary, &[]);

    // One lbs process per root: a second server on the same tree is refused, not raced.
    let second = run(lbs(d, &["sync", "serve"], "primary", BACKUP)
        .arg("--root")
        .arg(&primary)
        .args(["--listen", "127.0.0.1:0"]));
    assert!(!second.status.success());
    assert!(
        text(&second).contains("in use by another lbs process"),
        "{}",
        text(&second)
    );

    let pull = |expect_code: i32| {
        let out = run(lbs(d, &["sync", "pull"], "backup", PRIMARY)
            .arg("--root")
            .arg(&backup)
            .args(["--from", &addr]));
        assert_eq!(out.status.code(), Some(expect_code), "{}", text(&out));
        text(&out)
    };
    let first_pull = pull(0);
    assert!(first_pull.contains("fetched 2 file(s)"), "{first_pull}");
    assert!(first_pull.contains("in sync"), "{first_pull}");

    let verify = |a: &Path, b: &Path| run(Command::new(LBS).args(["sync", "verify"]).arg(a).arg(b));
    let same = verify(&primary, &backup);
    assert!(same.status.success(), "{}", text(&same));

    // A change on the primary: the backup differs until the next pull.
    std::fs::write(
        primary.join("extensions.conf"),
        b"[default]\nexten => 100,1,Answer()\n",
    )
    .unwrap();
    let differs = verify(&primary, &backup);
    assert_eq!(differs.status.code(), Some(1));
    assert!(
        text(&differs).contains("differs   extensions.conf"),
        "{}",
        text(&differs)
    );
    let second_pull = pull(0);
    assert!(second_pull.contains("fetched 1 file(s)"), "{second_pull}");
    assert!(verify(&primary, &backup).status.success());

    // A file name that is a terminal escape (clear the screen, retitle the window) is copied
    // as it is, but shown escaped: a name cannot rewrite what the operator reads.
    std::fs::write(primary.join("x\u{1b}[2J\u{1b}]0;owned\u{7}.wav"), b"RIFF").unwrap();
    let differs = verify(&primary, &backup);
    assert_eq!(differs.status.code(), Some(1));
    let shown = text(&differs);
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );
    assert!(
        shown.contains("x\\u{1b}[2J\\u{1b}]0;owned\\u{7}.wav"),
        "{shown}"
    );
    let third_pull = pull(0);
    assert!(third_pull.contains("fetched 1 file(s)"), "{third_pull}");
    assert!(verify(&primary, &backup).status.success());

    // Only the partner may pull: the primary's own identity is refused.
    let out = run(lbs(d, &["sync", "pull"], "primary", PRIMARY)
        .arg("--root")
        .arg(&backup)
        .args(["--from", &addr]));
    assert!(!out.status.success());
    assert!(text(&out).contains("refused"), "{}", text(&out));

    // A backup that knows a newer generation than this primary's (it was promoted past it)
    // does not take a copy from it, and the primary, told, serves it nothing either.
    let out = run(
        lbs(d, &["sync", "pull", "--generation", "2"], "backup", PRIMARY)
            .arg("--root")
            .arg(&backup)
            .args(["--from", &addr]),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("never flows from a lower generation"),
        "{}",
        text(&out)
    );
    assert!(verify(&primary, &backup).status.success());

    let status = lbs_tests::terminate(&mut server.0, "lbs sync serve", Duration::from_secs(10));
    assert!(status.success(), "serve exited with {status}");
    let log = drain.join().unwrap().join("\n");
    assert!(
        log.contains(&format!("box {BACKUP} (backup) connected")),
        "{log}"
    );
}

/// `lbs sync serve` (as the primary, `extra` added) of `root` on a free port: the server, its
/// address, and the thread that collects what it prints.
fn start_serve(
    d: &Path,
    root: &Path,
    extra: &[&str],
) -> (Server, String, std::thread::JoinHandle<Vec<String>>) {
    let mut args = vec!["sync", "serve"];
    args.extend_from_slice(extra);
    let mut serve = lbs(d, &args, "primary", BACKUP);
    serve
        .arg("--root")
        .arg(root)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped());
    let mut server = Server(serve.spawn().unwrap());
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_owned();
    // Keep draining the server's output so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    (server, addr, drain)
}

/// The fingerprint of the key in `label`'s certificate.
fn fingerprint(dir: &Path, label: &str) -> String {
    let identity = lbs_protocol::Identity::load(
        &dir.join(format!("{label}.pem")),
        &dir.join(format!("{label}.key")),
    )
    .unwrap();
    lbs_protocol::tls::key_fingerprint(identity.certificate()).unwrap()
}

#[test]
fn a_pinned_partner_key_shuts_out_the_old_certificate_of_a_box_activated_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    identities(d);
    let (primary, backup) = (d.join("primary-tree"), d.join("backup-tree"));
    std::fs::create_dir_all(&primary).unwrap();
    std::fs::create_dir_all(&backup).unwrap();
    std::fs::write(primary.join("sip.conf"), b"[trunk]\nsecret=hunter2\n").unwrap();
    let pin = fingerprint(d, "backup");
    assert_ne!(pin, fingerprint(d, "backup-old"));
    let (mut server, addr, drain) = start_serve(d, &primary, &["--partner-key", &pin]);
    let pull = |label: &str, extra: &[&str]| {
        let mut args = vec!["sync", "pull"];
        args.extend_from_slice(extra);
        run(lbs(d, &args, label, PRIMARY)
            .arg("--root")
            .arg(&backup)
            .args(["--from", &addr]))
    };
    // The old certificate: its SID is the partner's, its key no longer is.
    let old = pull("backup-old", &[]);
    assert!(!old.status.success(), "{}", text(&old));
    assert!(
        !backup.join("sip.conf").exists(),
        "the trunk secret reached the old box"
    );
    // The box as activated now.
    let now = pull("backup", &[]);
    assert!(now.status.success(), "{}", text(&now));
    assert!(backup.join("sip.conf").exists());
    // The other way round: a backup pinned to another key takes nothing from this primary.
    let wrong = pull("backup", &["--partner-key", &fingerprint(d, "backup-old")]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("no longer gets in"),
        "{}",
        text(&wrong)
    );
    let status = lbs_tests::terminate(&mut server.0, "lbs sync serve", Duration::from_secs(10));
    assert!(status.success(), "serve exited with {status}");
    let log = drain.join().unwrap().join("\n");
    assert!(log.contains("no longer gets in"), "{log}");
}

#[test]
fn a_pull_from_a_server_that_never_speaks_tls_fails_with_the_reason_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    identities(d);
    let backup = d.join("backup-tree");
    std::fs::create_dir_all(&backup).unwrap();
    // Accepts TCP (the kernel does, for the listen backlog) and says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = run(lbs(
        d,
        &[
            "sync",
            "pull",
            "--root",
            backup.to_str().unwrap(),
            "--from",
            &address,
        ],
        "backup",
        PRIMARY,
    )
    .stdin(Stdio::null()));
    let took = started.elapsed();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("did not complete the TLS handshake within 10s"),
        "{said}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    drop(silent);
}

/// Bytes of a file nobody would compress or dedupe: a stand-in for a recording.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn a_pull_killed_with_sigkill_mid_file_resumes_from_what_reached_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    identities(d);
    let (primary, backup) = (d.join("primary-tree"), d.join("backup-tree"));
    std::fs::create_dir_all(primary.join("monitor")).unwrap();
    std::fs::create_dir_all(&backup).unwrap();
    const MIB: usize = 1024 * 1024;
    let content = noise(400 * MIB);
    std::fs::write(primary.join("monitor/call.wav"), &content).unwrap();
    let (_server, addr, _drain) = start_serve(d, &primary, &[]);
    let pull = || {
        let mut cmd = lbs(d, &["sync", "pull"], "backup", PRIMARY);
        cmd.arg("--root").arg(&backup).args(["--from", &addr]);
        cmd
    };

    // The first pull is killed (SIGKILL: no clean-up runs) once 64 MiB of the file are on
    // the backup's disk.
    let mut first = Server(
        pull()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let temp_len = || {
        std::fs::read_dir(backup.join("monitor"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().as_encoded_bytes().starts_with(b".lbs-tmp."))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let kept = loop {
        if let Some(len) = temp_len().filter(|len| *len >= 64 * MIB as u64) {
            break len;
        }
        assert!(
            first.0.try_wait().unwrap().is_none(),
            "the pull ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "the pull never got 64 MiB in");
        std::thread::sleep(Duration::from_millis(5));
    };
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(
        temp_len().is_some_and(|len| len < content.len() as u64),
        "killed too late to test anything"
    );

    // The next pull resumes: what crossed the wire is about what was missing.
    let out = run(&mut pull());
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("1 interrupted transfer(s) resumed"), "{said}");
    let fetched_mib: f64 = said
        .split("fetched 1 file(s), ")
        .nth(1)
        .and_then(|rest| rest.split(" MiB").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fetched figure in {said}"));
    let missing_mib = (content.len() as u64 - kept) as f64 / MIB as f64;
    assert!(
        fetched_mib <= missing_mib + 1.0,
        "fetched {fetched_mib} MiB, {missing_mib:.1} MiB were missing (kept {kept} bytes)\n{said}"
    );
    assert!(
        std::fs::read(backup.join("monitor/call.wav")).unwrap() == content,
        "the resumed copy differs"
    );
    eprintln!("kept {kept} bytes at the kill; the resumed pull fetched {fetched_mib} MiB");
}

#[test]
fn pull_and_verify_say_what_is_not_synced_on_either_side_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    identities(d);
    let (primary, backup) = (d.join("primary-tree"), d.join("backup-tree"));
    std::fs::create_dir_all(primary.join("voicemail")).unwrap();
    std::fs::create_dir_all(&backup).unwrap();
    std::fs::write(primary.join("extensions.conf"), b"[default]\n").unwrap();
    let fifo = |path: &Path| assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
    fifo(&primary.join("voicemail/agi.pipe"));
    fifo(&backup.join("local.pipe"));
    let (_server, addr, _drain) = start_serve(d, &primary, &[]);
    let out = run(lbs(d, &["sync", "pull"], "backup", PRIMARY)
        .arg("--root")
        .arg(&backup)
        .args(["--from", &addr]));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(
            "skipped on the partner voicemail/agi.pipe: FIFO: only files, directories and symlinks are synced"
        ),
        "{said}"
    );
    assert!(said.contains("skipped here local.pipe: FIFO"), "{said}");

    let out = run(Command::new(LBS)
        .args(["sync", "verify"])
        .arg(&primary)
        .arg(&backup));
    let said = text(&out);
    assert!(
        said.contains("not synced voicemail/agi.pipe in ")
            && said.contains("not synced local.pipe in "),
        "{said}"
    );
}

#[test]
fn verify_compares_hard_links_too() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, backup) = (dir.path().join("primary"), dir.path().join("backup"));
    std::fs::create_dir_all(&primary).unwrap();
    std::fs::write(primary.join("greet.wav"), vec![5u8; 10_000]).unwrap();
    std::fs::hard_link(primary.join("greet.wav"), primary.join("greet2.wav")).unwrap();
    // `cp -a` keeps hard links: identical.
    let cp = |args: &[&str]| assert!(Command::new("cp").args(args).status().unwrap().success());
    cp(&["-a", primary.to_str().unwrap(), backup.to_str().unwrap()]);
    let verify = || {
        run(Command::new(LBS)
            .args(["sync", "verify"])
            .arg(&primary)
            .arg(&backup))
    };
    let out = verify();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The same content and metadata as a separate copy: one difference, named.
    let copy = dir.path().join("copy.wav");
    cp(&[
        "-p",
        backup.join("greet2.wav").to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    std::fs::rename(&copy, backup.join("greet2.wav")).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not linked greet.wav, greet2.wav"),
        "{}",
        text(&out)
    );
}
