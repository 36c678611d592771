//! Images: registration, holders, pins, removal, and the binary-cache signing key.

use super::{Applied, ApplyError, State};
use crate::command::CommandOutput;
use crate::ids::{valid_name, BlobHash, NodeId};
use crate::image::{Image, MAX_IMAGE_BYTES, MAX_IMAGE_NARS};

impl State {
    pub(super) fn add_image(&mut self, image: &Image) -> Applied {
        let invalid = |m: String| Err(ApplyError::InvalidImage(m));
        if !valid_name(&image.name) {
            return invalid(format!(
                "{:?}: names are 1 to 64 of a-z 0-9 . _ -",
                image.name
            ));
        }
        if image.nar_count == 0 || image.nar_count > MAX_IMAGE_NARS {
            return invalid(format!("an image lists 1 to {MAX_IMAGE_NARS} store paths"));
        }
        if image.nar_size > MAX_IMAGE_BYTES {
            return invalid(format!("an image is at most {MAX_IMAGE_BYTES} bytes"));
        }
        if !image.root.starts_with(&format!("{}/", image.store_dir)) {
            return invalid(format!(
                "root {} is not in store dir {}",
                image.root, image.store_dir
            ));
        }
        if let Some(t) = &image.tenant {
            if !valid_name(t) {
                return invalid(format!("invalid tenant name {t:?}"));
            }
        }
        for node in &image.holders {
            self.check_not_removed(*node)?;
            if self.members.get(node).is_none() {
                return Err(ApplyError::UnknownMember(*node));
            }
        }
        match self.images.get(&image.name) {
            Some(existing) if existing.manifest != image.manifest => {
                Err(ApplyError::ImageExists(image.name.clone()))
            }
            Some(_) => {
                let holders = image.holders.clone();
                self.images
                    .update(&image.name, |i| i.holders.extend(holders));
                Ok(CommandOutput::Done)
            }
            None => {
                self.images.insert(image.name.clone(), image.clone());
                Ok(CommandOutput::Done)
            }
        }
    }

    pub(super) fn set_image_holder(
        &mut self,
        name: &String,
        manifest: &BlobHash,
        node: NodeId,
        held: bool,
    ) -> Applied {
        let image = self
            .images
            .get(name)
            .ok_or_else(|| ApplyError::UnknownImage(name.clone()))?;
        if image.manifest != *manifest {
            return Err(ApplyError::ImageChanged(name.clone()));
        }
        if held {
            self.check_not_removed(node)?;
            if self.members.get(&node).is_none() {
                return Err(ApplyError::UnknownMember(node));
            }
        }
        self.images.update(name, |i| {
            if held {
                i.holders.insert(node);
            } else {
                i.holders.remove(&node);
            }
        });
        Ok(CommandOutput::Done)
    }

    pub(super) fn pin_image(&mut self, name: &String, pinned: bool) -> Applied {
        if self.images.update(name, |i| i.pinned = pinned) {
            Ok(CommandOutput::Done)
        } else {
            Err(ApplyError::UnknownImage(name.clone()))
        }
    }

    pub(super) fn remove_image(&mut self, name: &String) -> Applied {
        match self.images.get(name) {
            None => Err(ApplyError::UnknownImage(name.clone())),
            Some(i) if i.pinned => Err(ApplyError::ImagePinned(name.clone())),
            Some(_) => {
                if let Some((vm, _)) = self.vms.iter().find(|(_, v)| &v.spec.image == name) {
                    return Err(ApplyError::ImageInUse(name.clone(), vm.clone()));
                }
                self.images.remove(name);
                Ok(CommandOutput::Done)
            }
        }
    }

    /// Sets the cache key unless one is set: the first import's key stays.
    pub(super) fn set_cache_key(&mut self, secret: &str) -> Applied {
        if !self.cache_key.contains(&0) {
            self.cache_key.insert(0, secret.to_string());
        }
        Ok(CommandOutput::Done)
    }

    /// Takes `node` off every image's holders (it left the cluster).
    pub(super) fn drop_holder(&mut self, node: NodeId) {
        let held: Vec<String> = self
            .images
            .iter()
            .filter(|(_, i)| i.holders.contains(&node))
            .map(|(k, _)| k.clone())
            .collect();
        for name in held {
            self.images.update(&name, |i| {
                i.holders.remove(&node);
            });
        }
    }

    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.images.values()
    }

    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.get(&name.to_string())
    }

    /// The images whose manifest is `manifest` (normally one).
    pub fn images_by_manifest(&self, manifest: &BlobHash) -> impl Iterator<Item = &Image> {
        let manifest = *manifest;
        self.images.values().filter(move |i| i.manifest == manifest)
    }

    /// The binary-cache signing key (Nix's secret-key form), once the first import set it.
    pub fn cache_key(&self) -> Option<&String> {
        self.cache_key.get(&0)
    }
}
