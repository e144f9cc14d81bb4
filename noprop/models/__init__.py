"""NoProp models: DT, CT, FM and the back-propagation baseline."""
