from magistune.cli import main

raise SystemExit(main())
