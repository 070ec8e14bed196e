//! Writing an output file so that a failed run leaves nothing behind: the data goes to a
//! temporary file in the destination's directory (so the final rename stays on one file
//! system and is atomic) and is renamed over the destination only once it is complete.
//! Until then, dropping the [`Pending`] file deletes it. An existing destination is left
//! untouched by a failed run.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An output file being written under a temporary name.
pub struct Pending {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Pending {
    /// Creates the temporary file next to `dest`. Done before computing, so a missing or
    /// read-only directory is reported before the work rather than after it.
    pub fn create(dest: &Path) -> Result<Pending, String> {
        let name =
            dest.file_name().ok_or_else(|| format!("{}: the output path does not name a file", dest.display()))?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A dot-name with the pid: hidden from globs like `*.npy`, distinct between concurrent
        // runs; the counter only matters if a crashed run left the same name behind.
        for attempt in 0..100u32 {
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".{}-{attempt}.vistok-tmp", std::process::id()));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => return Ok(Pending { tmp, dest: dest.to_path_buf(), file: Some(BufWriter::new(f)) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("{}: cannot create the output file: {e}", dest.display())),
            }
        }
        Err(format!("{}: cannot create a temporary output file (100 stale ones exist)", dest.display()))
    }

    /// Runs `write` on the temporary file, then flushes it to disk and renames it to the
    /// destination. On any error the temporary file is removed (by `Drop`).
    pub fn commit(mut self, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<(), String> {
        let dest = self.dest.clone();
        let err = |e: std::io::Error| format!("{}: cannot write the output file: {e}", dest.display());
        let mut w = self.file.take().ok_or_else(|| err(std::io::Error::other("already written")))?;
        write(&mut w).map_err(err)?;
        w.flush().map_err(err)?;
        let f = w.into_inner().map_err(|e| err(e.into_error()))?;
        // So that the renamed file is never seen half-written after a crash.
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).map_err(err)?;
        // Renamed: nothing left for `Drop` to clean up.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.file.take();
        if !self.tmp.as_os_str().is_empty() {
            // Best effort: there is no one to report a failure to.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
