# picoimg: replaces the package's example configuration, which enables a one-node server and
# a client (Nomad merges every file here and a later file cannot switch a server off).
# picoimg-firstboot writes this node's configuration to 50-picoimg.json from the cluster file.
data_dir = "/opt/nomad/data"
