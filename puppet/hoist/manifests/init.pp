# @summary Installs hoist, writes its agent file and its container data, and runs the agent.
#
# The container data is the original hoist module's Hiera data, unchanged: `hoist::containers` (a
# hash of containers, looked up with a deep merge across the hierarchy, so a node's level can change
# one field of a container declared in common.yaml) and `hoist::purge`. They are resolved here, with
# Hiera's interpolations, and written as YAML to `${config_dir}/containers.d/puppet.yaml`, which the
# agent reloads by itself when it changes. Nothing else is needed per container: the agent runs,
# health-checks, updates and removes them.
#
# @example
#   include hoist
#
# @param manage_package Install the package (false: it is installed some other way).
# @param package_ensure The package resource's ensure (`installed`, `latest`, a version).
# @param package_source A .deb file to install from (with the dpkg provider) instead of a repository.
# @param manage_service Manage the hoist service; false where systemd does not run (a container, a
#   chroot), leaving the agent to be started some other way.
# @param service_ensure `running` or `stopped`.
# @param service_enable Start the service at boot.
# @param config_dir Where the agent file (hoist.yaml) and the data directory (containers.d) are.
# @param state_dir The agent's state_dir: machine state, the embedded store, the control socket.
# @param node The node name (default: the agent's own default, the hostname).
# @param backend `embedded` (this node alone) or `nats` (a fleet).
# @param nats_servers NATS URLs, for backend nats.
# @param nats_creds A NATS credentials file (at most one of creds, nkey, token).
# @param nats_nkey A NATS nkey seed file.
# @param nats_token A NATS token.
# @param agent_facts Facts for `%{facts.…}` in the container data as the agent interpolates it, merged
#   over its built-in hostname and networking.ip.
# @param settings Any other agent-file settings (docker, metrics, rollout, fleet, registration, …),
#   deep-merged over what the parameters above write.
class hoist (
  Boolean $manage_package = true,
  String[1] $package_ensure = 'installed',
  Optional[String[1]] $package_source = undef,
  Boolean $manage_service = true,
  Enum['running', 'stopped'] $service_ensure = 'running',
  Boolean $service_enable = true,
  Stdlib::Absolutepath $config_dir = '/etc/hoist',
  Stdlib::Absolutepath $state_dir = '/var/lib/hoist',
  Optional[String[1]] $node = undef,
  Enum['embedded', 'nats'] $backend = 'embedded',
  Array[String[1]] $nats_servers = [],
  Optional[Stdlib::Absolutepath] $nats_creds = undef,
  Optional[Stdlib::Absolutepath] $nats_nkey = undef,
  Optional[Variant[String[1], Sensitive[String[1]]]] $nats_token = undef,
  Hash $agent_facts = {},
  Hash $settings = {},
) {
  # Looked up here rather than as class parameters: a parameter's automatic lookup takes the first
  # level that has the key, and a node's `hoist::containers` would hide common.yaml's whole hash.
  $containers = lookup('hoist::containers', Hash, 'deep', {})
  $purge = lookup('hoist::purge', Boolean, 'first', true)
  $data_dir = "${config_dir}/containers.d"

  $token = $nats_token ? {
    Sensitive => $nats_token.unwrap,
    default   => $nats_token,
  }
  $nats = {
    'servers' => $nats_servers,
    'creds'   => $nats_creds,
    'nkey'    => $nats_nkey,
    'token'   => $token,
  }.filter |$key, $value| { $value =~ NotUndef and $value != [] }

  $agent = {
    'node'      => $node,
    'backend'   => $backend,
    'state_dir' => $state_dir,
    'data'      => [$data_dir],
    'nats'      => $nats,
    'facts'     => $agent_facts,
  }.filter |$key, $value| { $value =~ NotUndef and $value != {} }

  if $manage_package {
    if $package_source {
      package { 'hoist':
        ensure   => $package_ensure,
        provider => 'dpkg',
        source   => $package_source,
        before   => File[$config_dir],
      }
    } else {
      package { 'hoist':
        ensure => $package_ensure,
        before => File[$config_dir],
      }
    }
  }

  file { $config_dir:
    ensure => directory,
    owner  => 'root',
    group  => 'root',
    mode   => '0755',
  }

  file { $data_dir:
    ensure => directory,
    owner  => 'root',
    group  => 'root',
    mode   => '0755',
  }

  # May hold a NATS token: readable by root only.
  file { "${config_dir}/hoist.yaml":
    ensure    => file,
    owner     => 'root',
    group     => 'root',
    mode      => '0600',
    show_diff => false,
    content   => "# Managed by Puppet (class hoist); changes here are overwritten.\n${deep_merge($agent, $settings).to_yaml}",
  }

  file { "${data_dir}/puppet.yaml":
    ensure  => file,
    owner   => 'root',
    group   => 'root',
    mode    => '0644',
    content => "# Managed by Puppet (class hoist) from Hiera's hoist::containers and hoist::purge.\n${ {
        'hoist::purge'      => $purge,
        'hoist::containers' => $containers,
      }.to_yaml}",
  }

  if $manage_service {
    # A changed agent file needs a restart; changed container data is reloaded by the agent itself.
    service { 'hoist':
      ensure    => $service_ensure,
      enable    => $service_enable,
      subscribe => File["${config_dir}/hoist.yaml"],
      require   => File["${data_dir}/puppet.yaml"],
    }
  }
}
