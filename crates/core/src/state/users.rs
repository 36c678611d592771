//! Users and the authorization policies, and who holds a key.

use super::{Applied, ApplyError, State};
use crate::command::CommandOutput;
use crate::ids::{valid_name, EndpointKey};
use crate::user::User;

impl State {
    pub(super) fn add_user(&mut self, user: &User) -> Applied {
        if !valid_name(&user.name) {
            return Err(ApplyError::InvalidUser(format!(
                "{:?}: names are 1 to 64 of a-z 0-9 . _ -",
                user.name
            )));
        }
        if user.roles.is_empty() || !user.roles.iter().all(|r| valid_name(r)) {
            return Err(ApplyError::InvalidUser(
                "give at least one role, each 1 to 64 of a-z 0-9 . _ -".into(),
            ));
        }
        if let Some(t) = &user.tenant {
            if !valid_name(t) {
                return Err(ApplyError::InvalidUser(format!(
                    "invalid tenant name {t:?}"
                )));
            }
        }
        if self.users.contains(&user.name) {
            return Err(ApplyError::UserExists(user.name.clone()));
        }
        if let Some(holder) = self.key_holder(&user.key) {
            return Err(ApplyError::KeyInUse(user.key, holder));
        }
        self.users.insert(user.name.clone(), user.clone());
        Ok(CommandOutput::Done)
    }

    pub(super) fn remove_user(&mut self, name: &String) -> Applied {
        match self.users.remove(name) {
            Some(_) => Ok(CommandOutput::Done),
            None => Err(ApplyError::UnknownUser(name.clone())),
        }
    }

    pub(super) fn set_user_key(&mut self, name: &String, key: &EndpointKey) -> Applied {
        if !self.users.contains(name) {
            return Err(ApplyError::UnknownUser(name.clone()));
        }
        if let Some(holder) = self.key_holder(key) {
            return Err(ApplyError::KeyInUse(*key, holder));
        }
        let key = *key;
        self.users.update(name, |u| u.key = key);
        Ok(CommandOutput::Done)
    }

    pub(super) fn set_policies(&mut self, text: &str) -> Applied {
        self.policies.insert(0, text.to_string());
        Ok(CommandOutput::Done)
    }

    /// Who holds `key`: a member, an admin credential or a user.
    pub fn key_holder(&self, key: &EndpointKey) -> Option<String> {
        if let Some(m) = self.member_by_endpoint(key) {
            return Some(format!("node {}", m.id));
        }
        if let Some(a) = self.admins.get(key) {
            return Some(format!("the admin credential of node {}", a.node));
        }
        self.user_by_key(key).map(|u| format!("user {}", u.name))
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(&name.to_string())
    }

    pub fn user_by_key(&self, key: &EndpointKey) -> Option<&User> {
        self.users.values().find(|u| &u.key == key)
    }

    /// The policies set with `SetPolicies`; `None` means the built-in defaults.
    pub fn policies(&self) -> Option<&String> {
        self.policies.get(&0)
    }
}
