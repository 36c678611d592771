//! The `image …` requests: what each checks of its caller and request, then the image
//! machinery (`crate::images`) does the work.

use std::path::Path;

use blixard_images::{fetch_manifest, Holder};
use blixard_net::api::{
    ApiError, CacheKeyInfo, ImageDetail, ImageEntries, ImageImport, ImageInfo, ImagePath,
    ImagePull, ImageRemoved, ProgressSink, RequestFrame, Response, ResponseFrame,
};
use blixard_net::authz::{image_entity, Principal};

use super::Api;
use crate::images::{blob_hash, Images};

pub(super) async fn import(
    images: &Images,
    principal: &Principal,
    r: &ImageImport,
    sink: ProgressSink,
) -> ResponseFrame {
    if !blixard_core::valid_name(&r.name) {
        return Err(ApiError::BadRequest(format!(
            "image name {:?}: names are 1 to 64 of a-z 0-9 . _ -",
            r.name
        )));
    }
    let path = Path::new(&r.path);
    if !path.is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "{}: give an absolute path (it is read on the node's host)",
            r.path
        )));
    }
    // An import reads this host's files: only the node's own admin credential (which can
    // read the data dir anyway) and the host's own configuration may name any path;
    // others stay in import_paths.
    if !matches!(principal, Principal::Admin(..) | Principal::Host(..)) {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !images.import_paths.iter().any(|p| real.starts_with(p)) {
            return Err(ApiError::Rejected(format!(
                "{}: imports by {principal} must come from {} (images.import_paths)",
                r.path,
                images
                    .import_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let tenant = r
        .tenant
        .clone()
        .or_else(|| principal.tenant().map(str::to_string));
    let image = images.import(&r.name, path, tenant, r.pin, sink).await?;
    Ok(Response::ImageImport(ImageInfo { image }))
}

pub(super) async fn list(api: &Api, principal: &Principal, stale: bool) -> ResponseFrame {
    api.cluster.barrier(stale).await?;
    let may = api.may(principal);
    let images = api
        .cluster
        .state()
        .images()
        .filter(|i| may("image:read", &image_entity(i)))
        .cloned()
        .collect();
    Ok(Response::ImageList(ImageEntries { images }))
}

pub(super) async fn show(images: &Images, name: &str, stale: bool) -> ResponseFrame {
    images.cluster.barrier(stale).await?;
    let image = images.image_named(name)?;
    let holders: Vec<Holder> = images
        .holders_of(&image)
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    let manifest = fetch_manifest(
        &images.store,
        images.cluster.client.endpoint(),
        blob_hash(image.manifest),
        &holders,
    )
    .await
    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let paths = manifest
        .entries
        .iter()
        .map(|e| ImagePath {
            path: e.path.clone(),
            nar_hash: e.nar_hash.clone(),
            nar_size: e.nar_size,
            references: e.references.clone(),
            blob: e.blob.clone(),
        })
        .collect();
    Ok(Response::ImageShow(ImageDetail { image, paths }))
}

/// A pull for another node is handed to that node; one for this node fetches here.
pub(super) async fn pull(
    images: &Images,
    frame: &RequestFrame,
    r: &ImagePull,
    sink: ProgressSink,
) -> ResponseFrame {
    let me = images.cluster.me();
    if let Some(target) = r.node.filter(|n| *n != me) {
        if frame.forwarded {
            return Err(ApiError::BadRequest(
                "a forwarded pull must be for the node it reached".into(),
            ));
        }
        if images.cluster.state().member(target).is_none() {
            return Err(ApiError::NotFound(format!("node {target} is not a member")));
        }
        return images
            .cluster
            .forward_to(target, frame.request.clone(), &sink)
            .await;
    }
    images.bounded(|| images.cluster.barrier(false)).await?;
    let image = images.image_named(&r.name)?;
    Ok(Response::ImagePull(images.pull_here(&image, sink).await?))
}

pub(super) async fn pin(images: &Images, name: &str, pinned: bool) -> ResponseFrame {
    let image = images.pin(name, pinned).await?;
    Ok(Response::ImagePin(ImageInfo { image }))
}

pub(super) async fn remove(images: &Images, name: &str) -> ResponseFrame {
    images.remove(name).await?;
    Ok(Response::ImageRemove(ImageRemoved {}))
}

pub(super) fn cache_key(images: &Images) -> ResponseFrame {
    Ok(Response::CacheKey(CacheKeyInfo {
        public_key: images.cache_public_key(),
        url: images.cache_url.clone(),
    }))
}
