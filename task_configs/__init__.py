"""e2u's lm-eval task and group YAMLs (data only). A package so the folder can be located with
``importlib.util.find_spec`` from the start-up hook without importing anything."""
