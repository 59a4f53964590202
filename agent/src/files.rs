//! The files tool: reads a text file under one directory, and nothing outside it.
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{AgentError, Result, ToolError};
use crate::tool::Tool;

/// Most bytes of a file returned; the rest is cut with a note.
pub const MAX_BYTES: usize = 32 * 1024;

/// Reads files under `root`. Every path is resolved with symlinks followed and `..`
/// applied (`canonicalize`) before it is compared with the root, so neither a link
/// nor a `..` nor an absolute path reaches outside it.
#[derive(Debug, Clone)]
pub struct FileReader {
    root: PathBuf,
}

impl FileReader {
    /// A reader of the files under `root`, which must be a directory.
    pub fn new(root: &Path) -> Result<FileReader> {
        let root = root.canonicalize().map_err(|e| {
            AgentError::Tools(format!("the files directory {}: {e}", root.display()))
        })?;
        if !root.is_dir() {
            return Err(AgentError::Tools(format!(
                "the files directory {} is not a directory",
                root.display()
            )));
        }
        Ok(FileReader { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The real path of `relative` if it lies under the root.
    pub fn resolve(&self, relative: &str) -> Result<PathBuf, ToolError> {
        if relative.trim().is_empty() {
            return Err(ToolError::Arguments("`path` is empty".into()));
        }
        let joined = self.root.join(relative);
        let real = joined
            .canonicalize()
            .map_err(|_| ToolError::Failed(format!("there is no file `{relative}`")))?;
        if !real.starts_with(&self.root) {
            return Err(ToolError::Failed(format!(
                "`{relative}` is outside the readable directory"
            )));
        }
        if !real.is_file() {
            return Err(ToolError::Failed(format!("`{relative}` is not a file")));
        }
        Ok(real)
    }

    /// The text of `relative` (lossy UTF-8), at most [`MAX_BYTES`] of it.
    pub fn read(&self, relative: &str) -> Result<String, ToolError> {
        let path = self.resolve(relative)?;
        let file = std::fs::File::open(&path)
            .map_err(|e| ToolError::Failed(format!("`{relative}`: {e}")))?;
        let mut bytes = Vec::new();
        file.take(MAX_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ToolError::Failed(format!("`{relative}`: {e}")))?;
        let cut = bytes.len() > MAX_BYTES;
        bytes.truncate(MAX_BYTES);
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if cut {
            text.push_str(&format!("\n[cut after {MAX_BYTES} bytes]"));
        }
        Ok(text)
    }

    /// The files directly under the root, sorted (what the tool's description lists).
    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Tool for FileReader {
    fn name(&self) -> &str {
        "read_file"
    }

    fn description(&self) -> &str {
        "Reads a text file by its path relative to the files directory."
    }

    fn parameters(&self) -> Value {
        let mut names = self.listing();
        names.truncate(50);
        let path = if names.is_empty() {
            json!({ "type": "string", "description": "The file's path" })
        } else {
            json!({
                "type": "string",
                "description": format!("The file's path, for example one of: {}", names.join(", "))
            })
        };
        json!({
            "type": "object",
            "properties": { "path": path },
            "required": ["path"]
        })
    }

    fn call(&self, arguments: &Value) -> Result<String, ToolError> {
        let path = arguments
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| ToolError::Arguments("`path` must be a string".into()))?;
        self.read(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> (tempfile::TempDir, FileReader) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), "alpha").unwrap();
        std::fs::write(root.join("sub/b.txt"), "beta").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
        let reader = FileReader::new(&root).unwrap();
        (dir, reader)
    }

    #[test]
    fn reads_inside_the_root() {
        let (_dir, r) = sandbox();
        assert_eq!(r.read("a.txt").unwrap(), "alpha");
        assert_eq!(r.read("sub/b.txt").unwrap(), "beta");
        assert_eq!(r.read("sub/../a.txt").unwrap(), "alpha");
        assert_eq!(r.call(&json!({"path": "a.txt"})).unwrap(), "alpha");
    }

    #[test]
    fn refuses_everything_outside() {
        let (dir, r) = sandbox();
        let outside = dir.path().join("secret.txt");
        for bad in [
            "../secret.txt",
            "sub/../../secret.txt",
            outside.to_str().unwrap(),
            "/etc/passwd",
        ] {
            let e = r.read(bad).unwrap_err();
            assert!(
                matches!(&e, ToolError::Failed(m) if m.contains("outside") || m.contains("no file")),
                "{bad}: {e}"
            );
            assert!(!e.to_string().contains("secret\n"));
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&outside, r.root().join("link.txt")).unwrap();
            std::os::unix::fs::symlink(dir.path(), r.root().join("up")).unwrap();
            for bad in ["link.txt", "up/secret.txt"] {
                let e = r.read(bad).unwrap_err();
                assert!(e.to_string().contains("outside"), "{bad}: {e}");
            }
        }
        assert!(r
            .read("sub")
            .unwrap_err()
            .to_string()
            .contains("not a file"));
        assert!(r
            .read("missing.txt")
            .unwrap_err()
            .to_string()
            .contains("no file"));
        assert!(matches!(r.read(""), Err(ToolError::Arguments(_))));
        assert!(matches!(
            r.call(&json!({"path": 3})),
            Err(ToolError::Arguments(_))
        ));
    }

    #[test]
    fn a_root_that_is_not_a_directory_is_refused() {
        let (dir, _r) = sandbox();
        assert!(FileReader::new(&dir.path().join("secret.txt")).is_err());
        assert!(FileReader::new(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn long_files_are_cut() {
        let (_dir, r) = sandbox();
        std::fs::write(r.root().join("big.txt"), "x".repeat(MAX_BYTES + 10)).unwrap();
        let text = r.read("big.txt").unwrap();
        assert!(text.ends_with(&format!("[cut after {MAX_BYTES} bytes]")));
    }
}
