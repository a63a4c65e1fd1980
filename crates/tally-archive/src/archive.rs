//! Where archive files live: a local directory (the default) or an
//! S3-compatible bucket, behind one `object_store` interface.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::{Error, Result};

/// S3-compatible bucket settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing slash).
    pub prefix: String,
    /// Endpoint URL for S3-compatible servers (MinIO, moto, R2…); empty: AWS.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveTarget {
    Local(PathBuf),
    S3(S3Config),
}

/// The archive root. Paths handed around are relative to it
/// (`tenant=a/date=…/hour=…/part-….parquet`).
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    local: Option<PathBuf>,
    /// How the target is described in logs and errors.
    pub describe: String,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Archive {
    pub fn open(target: &ArchiveTarget) -> Result<Archive> {
        match target {
            ArchiveTarget::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                    path: dir.display().to_string(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(dir)?;
                Ok(Archive {
                    store: Arc::new(store),
                    local: Some(dir.clone()),
                    describe: dir.display().to_string(),
                })
            }
            ArchiveTarget::S3(c) => {
                if c.bucket.is_empty() {
                    return Err(Error::Config(
                        "archive.s3.bucket is empty: name the bucket (or remove [archive.s3] to archive to the local data dir)".into(),
                    ));
                }
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&c.bucket)
                    .with_allow_http(c.allow_http);
                if !c.region.is_empty() {
                    b = b.with_region(&c.region);
                }
                if !c.endpoint.is_empty() {
                    b = b
                        .with_endpoint(&c.endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                if !c.access_key_id.is_empty() {
                    b = b
                        .with_access_key_id(&c.access_key_id)
                        .with_secret_access_key(&c.secret_access_key);
                }
                let s3: Arc<dyn ObjectStore> = Arc::new(b.build()?);
                let store: Arc<dyn ObjectStore> = if c.prefix.trim_matches('/').is_empty() {
                    s3
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(
                        s3,
                        c.prefix.trim_matches('/'),
                    ))
                };
                Ok(Archive {
                    store,
                    local: None,
                    describe: format!("s3://{}/{}", c.bucket, c.prefix.trim_matches('/')),
                })
            }
        }
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The root directory when the archive is local.
    pub fn local_root(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// Writes one object whole. Locally: temp file, fsync, rename, fsync the
    /// directory, so a file the manifest names survives a power cut.
    pub async fn put(&self, path: &str, data: Bytes) -> Result<()> {
        if let Some(root) = &self.local {
            let root = root.clone();
            let path = path.to_string();
            return tokio::task::spawn_blocking(move || put_local(&root, &path, &data))
                .await
                .map_err(|e| Error::Io {
                    path: "archive put".into(),
                    source: std::io::Error::other(e),
                })?;
        }
        self.store.put(&ObjPath::from(path), data.into()).await?;
        Ok(())
    }

    /// Copies one object to a second name (locally a hard link, then the
    /// directory is fsynced; on S3 a server-side copy).
    pub async fn copy(&self, from: &str, to: &str) -> Result<()> {
        if let Some(root) = &self.local {
            let (a, b) = (root.join(from), root.join(to));
            let _ = std::fs::remove_file(&b);
            std::fs::hard_link(&a, &b).map_err(io(&b))?;
            return sync_dir(b.parent().unwrap_or(root));
        }
        self.store
            .copy(&ObjPath::from(from), &ObjPath::from(to))
            .await?;
        Ok(())
    }

    /// Reads one object whole.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        Ok(self.store.get(&ObjPath::from(path)).await?.bytes().await?)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&ObjPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object under the root: (relative path, size).
    pub async fn list(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_modified()
            .await?
            .into_iter()
            .map(|(p, size, _)| (p, size))
            .collect())
    }

    /// Every object under the root with its last change: (relative path,
    /// size, last modified in ms since the epoch).
    pub async fn list_modified(&self) -> Result<Vec<(String, u64, i64)>> {
        let items: Vec<_> = self.store.list(None).try_collect().await?;
        Ok(items
            .into_iter()
            .map(|m| {
                (
                    m.location.to_string(),
                    m.size,
                    m.last_modified.timestamp_millis(),
                )
            })
            .collect())
    }

    /// When an object last changed (ms since the epoch); `None`: it does
    /// not exist.
    pub async fn modified(&self, path: &str) -> Result<Option<i64>> {
        match self.store.head(&ObjPath::from(path)).await {
            Ok(m) => Ok(Some(m.last_modified.timestamp_millis())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = p.display().to_string();
    move |source| Error::Io { path, source }
}

/// Makes the entries of `dir` (a rename, a link) survive a power cut.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn put_local(root: &Path, rel: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let path = root.join(rel);
    let dir = path.parent().unwrap_or(root).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("part")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(&dir)
}
