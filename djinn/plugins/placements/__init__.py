"""Built-in plugins, declared under the `djinn.plugins` entry-point group like any third party's."""
