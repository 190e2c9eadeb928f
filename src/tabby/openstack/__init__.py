"""OpenStack: the Neutron ML2 mechanism driver, and resync of Neutron into the Store."""
