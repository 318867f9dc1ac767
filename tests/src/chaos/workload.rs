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
    /// Voicemails written and not yet seen whole on the backup: name, content.
    unacked: Vec<(String, Vec<u8>)>,
    /// Seen whole on the backup.
    acked: Vec<(String, Vec<u8>)>,
    acked_config: u64,
    acked_recording: u64,
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
            acked_config: 0,
            acked_recording: 0,
        }
    }

    /// Writes what is due on `primary` and looks at what the other box has.
    pub(super) fn tick(&mut self, office: &Office, primary: &str) -> anyhow::Result<()> {
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
            std::fs::write(dir.join(&name), &content)?;
            self.unacked.push((name, content));
        }
        if self.last_config.elapsed() >= Duration::from_secs(3) {
            self.last_config = Instant::now();
            self.config_version += 1;
            let body = format!(
                "; edit {}\n[chaos]\nexten => {},1,Answer()\n",
                self.config_version, self.config_version
            );
            std::fs::write(
                office.set_dir(primary, "config").join(CONFIG),
                file_content(CONFIG, self.config_version, body.as_bytes()),
            )?;
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
            file.write_all(&chunk)?;
        }
        if self.last_ack.elapsed() >= Duration::from_millis(500) {
            self.last_ack = Instant::now();
            if let Some(backup) = BOXES.into_iter().find(|h| *h != primary) {
                self.look_at(office, backup);
            }
        }
        Ok(())
    }

    /// What `backup` has whole now counts as acknowledged.
    fn look_at(&mut self, office: &Office, backup: &str) {
        let dir = office.set_dir(backup, "voicemail").join(VOICEMAIL_DIR);
        let (seen, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unacked)
            .into_iter()
            .partition(|(name, content)| {
                std::fs::read(dir.join(name)).is_ok_and(|c| c == *content)
            });
        self.acked.extend(seen);
        self.unacked = still;
        if let Ok(content) = std::fs::read(office.set_dir(backup, "config").join(CONFIG))
            && let Ok(version) = file_version(CONFIG, &content)
        {
            self.acked_config = self.acked_config.max(version);
        }
        if let Ok(content) = std::fs::read(office.set_dir(backup, "recordings").join(RECORDING))
            && recording_prefix(self.seed, &content).is_ok()
        {
            self.acked_recording = self.acked_recording.max(content.len() as u64);
        }
    }

    /// What was written and acknowledged, in words.
    pub(super) fn summary(&self) -> String {
        format!(
            "workload: {} voicemails written, {} acknowledged; config edit {}, {} acknowledged; recording acknowledged to {} bytes",
            self.voicemails,
            self.acked.len(),
            self.config_version,
            self.acked_config,
            self.acked_recording
        )
    }

    /// Torn files on either box, and acknowledged ones missing on the final primary.
    pub(super) fn check(&self, office: &Office, primary: Option<&str>) -> Vec<String> {
        let mut found = Vec::new();
        for host in BOXES {
            let dir = office.set_dir(host, "voicemail").join(VOICEMAIL_DIR);
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
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
