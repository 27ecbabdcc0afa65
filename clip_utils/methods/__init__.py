"""The methods, one module each, registered as plug-ins (`clip_utils.registry`).

Importing this package imports every module in it; each method module ends with one
`registry.register(Method(...))`. A new method is a new module here: nothing else in the
package names it. Modules that are not methods (`common`, shared by the trained methods,
and `lora_adapters`) register nothing.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
