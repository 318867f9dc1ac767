//! The office's work during a chaos run, on whichever box is primary: a voicemail every
//! second, a config edit every 3 s, a recording growing 16 kB a second; and what the backup
//! acknowledged (a copy identical to what was written), so that the end can tell a lost file
//! from one that never left a dying primary.

use std::io::Write;
use std::time::{Duration, Instant};

use super::checker::{file_content, file_version, recording_byte, recording_prefix};
use crate::office::{BOXES, Office};

const VOICEMAIL_DIR: &str = "chaos";
const CONFIG: &str = "chaos.conf";
const RECORDING: &str = "chaos-recording.raw";

pub(super) struct Workload {
    seed: u64,
    voicemails: u64,
    config_version: u64,
    last_voicemail: Instant,
    last_config: Instant,
    last_append: Instant,
    last_ack: Instant,
    /// Voicemails written and not yet seen whole on the other box: name, content, the box
    /// written on.
    unacked: Vec<(String, Vec<u8>, &'static str)>,
    /// Seen whole on the box they were not written on.
    acked: Vec<(String, Vec<u8>)>,
    /// Each config edit's box.
    config_on: Vec<(u64, &'static str)>,
    acked_config: u64,
    /// The recording's appends in order: box, first and end offset.
    appended: Vec<(&'static str, u64, u64)>,
    acked_recording: u64,
    /// Files whose last write failed (a full disk): what is on disk is the PBX's own broken
    /// file, copied as it is, not a torn copy.
    broken: std::collections::BTreeSet<String>,
}

impl Workload {
    pub(super) fn new(seed: u64) -> Workload {
        let long_ago = Instant::now() - Duration::from_secs(10);
        Workload {
            seed,
            voicemails: 0,
            config_version: 0,
            last_voicemail: long_ago,
            last_config: long_ago,
            last_append: long_ago,
            last_ack: long_ago,
            unacked: Vec::new(),
            acked: Vec::new(),
            config_on: Vec::new(),
            acked_config: 0,
            appended: Vec::new(),
            acked_recording: 0,
            broken: Default::default(),
        }
    }

    /// Writes what is due on `primary` and looks at what the other box has.
    pub(super) fn tick(&mut self, office: &Office, primary: &'static str) -> anyhow::Result<()> {
        if self.last_ack.elapsed() >= Duration::from_millis(500) {
            self.last_ack = Instant::now();
            if let Some(other) = BOXES.into_iter().find(|h| *h != primary) {
                self.look_at(office, other);
            }
        }
        if self.last_voicemail.elapsed() >= Duration::from_secs(1) {
            self.last_voicemail = Instant::now();
            self.voicemails += 1;
            let name = format!("msg{:05}", self.voicemails);
            let body: Vec<u8> = (0..2_000 + (self.voicemails * 7919) % 30_000)
                .map(|i| recording_byte(self.seed ^ self.voicemails, i))
                .collect();
            let content = file_content(&name, self.voicemails, &body);
            let dir = office.set_dir(primary, "voicemail").join(VOICEMAIL_DIR);
            std::fs::create_dir_all(&dir)?;
            let written = std::fs::write(dir.join(&name), &content);
            self.note(&name, written.is_ok());
            written?;
            self.unacked.push((name, content, primary));
        }
        if self.last_config.elapsed() >= Duration::from_secs(3) {
            self.last_config = Instant::now();
            self.config_version += 1;
            let body = format!(
                "; edit {}\n[chaos]\nexten => {},1,Answer()\n",
                self.config_version, self.config_version
            );
            let written = std::fs::write(
                office.set_dir(primary, "config").join(CONFIG),
                file_content(CONFIG, self.config_version, body.as_bytes()),
            );
            self.note(CONFIG, written.is_ok());
            written?;
            self.config_on.push((self.config_version, primary));
        }
        if self.last_append.elapsed() >= Duration::from_millis(200) {
            self.last_append = Instant::now();
            let path = office.set_dir(primary, "recordings").join(RECORDING);
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            let at = file.metadata()?.len();
            let chunk: Vec<u8> = (at..at + 3_200)
                .map(|i| recording_byte(self.seed, i))
                .collect();
            // A failed append leaves a shorter prefix of the same stream: nothing to note.
            file.write_all(&chunk)?;
            self.appended.push((primary, at, at + 3_200));
        }
        Ok(())
    }

    fn note(&mut self, name: &str, written: bool) {
        if written {
            self.broken.remove(name);
        } else {
            self.broken.insert(name.to_owned());
        }
    }

    /// What `other` has whole now, of what was written on the other box, counts as
    /// acknowledged: it exists twice.
    fn look_at(&mut self, office: &Office, other: &'static str) {
        let dir = office.set_dir(other, "voicemail").join(VOICEMAIL_DIR);
        let (seen, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unacked)
            .into_iter()
            .partition(|(name, content, on)| {
                *on != other && std::fs::read(dir.join(name)).is_ok_and(|c| c == *content)
            });
        self.acked
            .extend(seen.into_iter().map(|(name, content, _)| (name, content)));
        self.unacked = still;
        if let Ok(content) = std::fs::read(office.set_dir(other, "config").join(CONFIG))
            && let Ok(version) = file_version(CONFIG, &content)
            && self
                .config_on
                .iter()
                .any(|(v, on)| *v == version && *on != other)
        {
            self.acked_config = self.acked_config.max(version);
        }
        if let Ok(content) = std::fs::read(office.set_dir(other, "recordings").join(RECORDING))
            && recording_prefix(self.seed, &content).is_ok()
        {
            // Up to the first byte `other` itself wrote last (those exist once).
            let own = self
                .appended
                .iter()
                .enumerate()
                .filter(|(i, (on, start, end))| {
                    *on == other
                        && !self.appended[i + 1..]
                            .iter()
                            .any(|(by, s, e)| by != on && s <= start && e >= end)
                })
                .map(|(_, (_, start, _))| *start)
                .min()
                .unwrap_or(u64::MAX);
            let acked = (content.len() as u64).min(own);
            self.acked_recording = self.acked_recording.max(acked);
        }
    }

    /// What was written and acknowledged, in words.
    pub(super) fn summary(&self) -> String {
        format!(
            "workload: {} voicemails written, {} acknowledged; config edit {}, {} acknowledged; recording acknowledged to {} bytes; {} write(s) failed on a full disk",
            self.voicemails,
            self.acked.len(),
            self.config_version,
            self.acked_config,
            self.acked_recording,
            self.broken.len()
        )
    }

    /// Torn files on either box, and acknowledged ones missing on the final primary.
    pub(super) fn check(&self, office: &Office, primary: Option<&str>) -> Vec<String> {
        let mut found = Vec::new();
        for host in BOXES {
            let dir = office.set_dir(host, "voicemail").join(VOICEMAIL_DIR);
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || self.broken.contains(&name) {
                    continue;
                }
                if let Err(why) = std::fs::read(entry.path())
                    .map_err(|e| e.to_string())
                    .and_then(|c| file_version(&name, &c))
                {
                    found.push(format!("{host}: voicemail {name} torn: {why}"));
                }
            }
            if let Ok(content) = std::fs::read(office.set_dir(host, "config").join(CONFIG))
                && !self.broken.contains(CONFIG)
                && let Err(why) = file_version(CONFIG, &content)
            {
                found.push(format!("{host}: {CONFIG} torn: {why}"));
            }
            if let Ok(content) = std::fs::read(office.set_dir(host, "recordings").join(RECORDING))
                && let Err(at) = recording_prefix(self.seed, &content)
            {
                found.push(format!("{host}: the recording torn at byte {at}"));
            }
        }
        let Some(primary) = primary else {
            return found;
        };
        let dir = office.set_dir(primary, "voicemail").join(VOICEMAIL_DIR);
        for (name, content) in &self.acked {
            if std::fs::read(dir.join(name)).ok().as_ref() != Some(content) {
                found.push(format!("{primary}: acknowledged voicemail {name} lost"));
            }
        }
        let config = std::fs::read(office.set_dir(primary, "config").join(CONFIG))
            .ok()
            .and_then(|c| file_version(CONFIG, &c).ok())
            .unwrap_or(0);
        if config < self.acked_config {
            found.push(format!(
                "{primary}: {CONFIG} at edit {config}, edit {} was acknowledged",
                self.acked_config
            ));
        }
        let recording = std::fs::metadata(office.set_dir(primary, "recordings").join(RECORDING))
            .map(|m| m.len())
            .unwrap_or(0);
        if recording < self.acked_recording {
            found.push(format!(
                "{primary}: the recording has {recording} bytes, {} were acknowledged",
                self.acked_recording
            ));
        }
        found
    }
}
